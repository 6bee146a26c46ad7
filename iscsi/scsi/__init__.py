"""The one SCSI codec both roles share (SAM-5 keeps SCSI apart from its
transport, so nothing here knows iSCSI).

Each command's CDB sits beside the codec of its parameter list or returned
data, by command set: :mod:`.rw` (READ/WRITE family, the hot path),
:mod:`.sbc` (other block commands), :mod:`.spc` (primary commands),
:mod:`.pr` (reservations), :mod:`.mmc` (CD/DVD), :mod:`.lun` (the SAM LUN
field, REPORT LUNS data), :mod:`.vpd` (INQUIRY data and VPD pages),
:mod:`.dispatch` (parse any CDB by operation code), on the shared pieces of
:mod:`.cdb_common` (errors carrying sense and the SPC-4 field pointer,
generic layouts); :mod:`.sense` and :mod:`.constants` complete it.

``build_*`` functions return CDB bytes from keyword arguments named like the
fields of the matching frozen dataclass, which ``parse_*`` returns from a
CDB off the wire (or raises a ``CDBError`` that carries the sense to answer);
returned data and parameter lists have ``build_*_data``/``parse_*`` codecs.
"""

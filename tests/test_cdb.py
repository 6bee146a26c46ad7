"""SCSI CDB builders/parsers and returned-data codecs (iscsi.scsi: rw, spc, sbc, pr, mmc, lun, vpd)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iscsi.scsi.cdb_common import (
    PROTOCOL_ID_ISCSI,
    Association,
    CDBError,
    CDBTooShort,
    CodeSet,
    DesignatorType,
    InvalidCDBField,
    ParameterListError,
    ParameterListLengthError,
    SCSIDataError,
    UnsupportedOpcode,
    cdb_length,
    check_control,
)
from iscsi.scsi.constants import Opcode, PRInAction, PROutAction, PRType, SenseKey
from iscsi.scsi.sense import CheckCondition
from iscsi.scsi.lun import (
    MAX_LUN,
    build_report_luns_data,
    decode_lun,
    encode_lun,
    parse_report_luns_data,
)
from iscsi.scsi.mmc import (
    GetConfiguration,
    GetEventStatusNotification,
    MechanismStatus,
    ReadToc,
    parse_get_configuration,
    parse_get_event_status_notification,
    parse_mechanism_status,
    parse_read_toc,
)
from iscsi.scsi.pr import (
    PersistentReserveIn,
    PersistentReserveOut,
    PRParameters,
    ReserveRelease,
    build_persistent_reserve_in,
    build_persistent_reserve_out,
    build_pr_out_parameters,
    parse_persistent_reserve_in,
    parse_persistent_reserve_out,
    parse_pr_out_parameters,
    parse_reserve_release,
)
from iscsi.scsi.rw import (
    RW_OPCODES,
    RWCommand,
    RWKind,
    build_compare_and_write,
    build_read,
    build_rw,
    build_write,
    build_write_same,
    parse_rw,
)
from iscsi.scsi.sbc import (
    GetLbaStatus,
    PreFetch,
    ReadCapacity10,
    ReadCapacity16,
    ReadCapacity16Data,
    ReadDefectData,
    SynchronizeCache,
    Unmap,
    UnmapDescriptor,
    build_get_lba_status,
    build_lba_status_data,
    build_read_capacity10,
    build_read_capacity10_data,
    build_read_capacity16,
    build_read_capacity16_data,
    build_synchronize_cache,
    build_unmap,
    build_unmap_parameter_list,
    parse_get_lba_status,
    parse_lba_status_data,
    parse_pre_fetch,
    parse_read_capacity10,
    parse_read_capacity10_data,
    parse_read_capacity16,
    parse_read_capacity16_data,
    parse_read_defect_data,
    parse_synchronize_cache,
    parse_unmap,
    parse_unmap_parameter_list,
)
from iscsi.scsi.spc import (
    ExtendedCopy,
    Inquiry,
    ModeSelect,
    ModeSense,
    PreventAllowMediumRemoval,
    ReceiveCopyResults,
    ReportLuns,
    ReportSupportedOpcodes,
    ReportSupportedTMFs,
    ReportTargetPortGroups,
    RequestSense,
    StartStopUnit,
    TestUnitReady,
    build_inquiry,
    build_mode_sense,
    build_report_luns,
    build_test_unit_ready,
    parse_extended_copy,
    parse_inquiry,
    parse_mode_select,
    parse_mode_sense,
    parse_prevent_allow_medium_removal,
    parse_receive_copy_results,
    parse_report_luns,
    parse_report_supported_opcodes,
    parse_report_supported_tmfs,
    parse_report_target_port_groups,
    parse_request_sense,
    parse_start_stop_unit,
    parse_test_unit_ready,
)
from iscsi.scsi.vpd import (
    BlockLimits,
    Designator,
    LogicalBlockProvisioning,
    StandardInquiry,
    build_standard_inquiry,
    BlockDeviceCharacteristics,
    build_vpd_block_device_characteristics,
    build_vpd_block_limits,
    build_vpd_device_identification,
    build_vpd_logical_block_provisioning,
    build_vpd_page,
    build_vpd_supported_pages,
    build_vpd_unit_serial,
    parse_standard_inquiry,
    parse_vpd_block_limits,
    parse_vpd_device_identification,
    parse_vpd_logical_block_provisioning,
    parse_vpd_page,
    parse_vpd_supported_pages,
    parse_vpd_unit_serial,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
b = st.booleans()


# --- annotated vectors -------------------------------------------------------


def test_read10_vector() -> None:
    cdb = bytes.fromhex(
        "28"  # READ(10)
        "18"  # DPO=1 (bit 4), FUA=1 (bit 3)
        "00003039"  # LBA 12345
        "05"  # group 5
        "0008"  # 8 blocks
        "00"  # control
    )
    assert build_read(12345, 8, dpo=True, fua=True, group=5) == cdb
    r = parse_rw(cdb)
    assert r == RWCommand(RWKind.READ, 0x28, 12345, 8, True, True, 5, 0)
    assert r.data_in_blocks == 8 and r.data_out_blocks == 0


def test_write16_vector() -> None:
    cdb = bytes.fromhex(
        "8a"  # WRITE(16)
        "68"  # WRPROTECT=3 (bits 7-5), FUA=1
        "0000010000000000"  # LBA 2**40
        "00010000"  # 65536 blocks
        "00"  # group
        "00"  # control
    )
    assert build_write(1 << 40, 65536, fua=True, protect=3) == cdb
    assert parse_rw(cdb) == RWCommand(
        RWKind.WRITE, 0x8A, 1 << 40, 65536, False, True, 0, 3
    )


def test_read6_zero_means_256() -> None:
    cdb = bytes.fromhex("081fffff0000")  # LBA 0x1fffff, length 0 = 256
    r = parse_rw(cdb)
    assert (r.lba, r.blocks) == (0x1FFFFF, 256)
    assert build_read(0x1FFFFF, 256, size=6) == cdb
    assert build_write(1, 1, size=6) == bytes.fromhex("0a 00 0001 01 00")
    with pytest.raises(ValueError):
        build_read(0, 0, size=6)
    with pytest.raises(ValueError):
        build_read(1 << 21, 1, size=6)


def test_inquiry_vector() -> None:
    cdb = bytes.fromhex("120183040000")  # EVPD, page 83h, alloc 1024
    assert build_inquiry(evpd=True, page_code=0x83, allocation_length=1024) == cdb
    assert parse_inquiry(cdb) == Inquiry(True, 0x83, 1024)


def test_read_capacity16_vector() -> None:
    cdb = bytes.fromhex("9e100000000000000000000000200000")
    assert build_read_capacity16() == cdb
    assert parse_cdb(cdb) == ReadCapacity16(32, 0, False)


def test_report_luns_vector() -> None:
    cdb = bytes.fromhex("a0 00 02 000000 00001000 00 00")
    assert build_report_luns(select_report=2, allocation_length=4096) == cdb
    assert parse_report_luns(cdb) == ReportLuns(2, 4096)


def test_compare_and_write_vector() -> None:
    cdb = bytes.fromhex("89100000000000000064000000010000")
    assert build_compare_and_write(100, 1, dpo=True) == cdb
    r = parse_rw(cdb)
    assert (
        r.kind is RWKind.COMPARE_AND_WRITE and r.lba == 100 and r.blocks == 1 and r.dpo
    )
    assert r.data_out_blocks == 2


def test_write_same16_unmap_vector() -> None:
    cdb = bytes.fromhex("93190000000000000010000001000000")  # ANCHOR|UNMAP|NDOB
    assert build_write_same(16, 256, unmap=True, anchor=True, ndob=True) == cdb
    r = parse_rw(cdb)
    assert (r.unmap, r.anchor, r.ndob, r.data_out_blocks) == (True, True, True, 0)


def test_pr_out_vectors() -> None:
    cdb = bytes.fromhex("5f010300000000001800")  # RESERVE, LU_SCOPE, EA
    assert (
        build_persistent_reserve_out(
            service_action=PROutAction.RESERVE,
            pr_type=PRType.EXCLUSIVE_ACCESS,
            parameter_list_length=24,
        )
        == cdb
    )
    assert parse_persistent_reserve_out(cdb) == PersistentReserveOut(1, 0, 3, 24)
    data = bytes.fromhex(
        "0123456789abcdef"  # reservation key
        "fedcba9876543210"  # service action reservation key
        "00000000"  # obsolete
        "05"  # ALL_TG_PT (bit 2), APTPL (bit 0)
        "00"
        "0000"
    )
    p = parse_pr_out_parameters(data)
    assert p == PRParameters(
        0x0123456789ABCDEF, 0xFEDCBA9876543210, False, True, True
    )
    assert build_pr_out_parameters(**dataclasses.asdict(p)) == data


# --- builder -> parser round trips for every CDB -------------------------------


def _ok_pr_out(x: PersistentReserveOut) -> bool:
    if x.service_action in (
        PROutAction.RESERVE,
        PROutAction.RELEASE,
        PROutAction.PREEMPT,
        PROutAction.PREEMPT_AND_ABORT,
    ):
        return x.scope == 0 and x.pr_type in {t.value for t in PRType}
    return True


def _cache_range(cls: type[Any]) -> st.SearchStrategy[Any]:
    """SYNCHRONIZE CACHE / PRE-FETCH: the same fields in both sizes."""
    return st.one_of(
        *(
            st.builds(
                cls,
                lba=lba,
                blocks=blocks,
                immed=b,
                group=st.integers(0, 63),
                cdb_size=st.just(size),
            )
            for size, lba, blocks in ((10, u32, u16), (16, u64, u32))
        )
    )


_BY_OPCODE: dict[int, Callable[[bytes], Any]] = {
    Opcode.INQUIRY: parse_inquiry,
    Opcode.TEST_UNIT_READY: parse_test_unit_ready,
    Opcode.REQUEST_SENSE: parse_request_sense,
    Opcode.REPORT_LUNS: parse_report_luns,
    Opcode.READ_CAPACITY_10: parse_read_capacity10,
    Opcode.UNMAP: parse_unmap,
    Opcode.SYNCHRONIZE_CACHE_10: parse_synchronize_cache,
    Opcode.SYNCHRONIZE_CACHE_16: parse_synchronize_cache,
    Opcode.PRE_FETCH_10: parse_pre_fetch,
    Opcode.PRE_FETCH_16: parse_pre_fetch,
    Opcode.MODE_SENSE_6: parse_mode_sense,
    Opcode.MODE_SENSE_10: parse_mode_sense,
    Opcode.MODE_SELECT_6: parse_mode_select,
    Opcode.MODE_SELECT_10: parse_mode_select,
    Opcode.START_STOP_UNIT: parse_start_stop_unit,
    Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL: parse_prevent_allow_medium_removal,
    Opcode.RESERVE_6: parse_reserve_release,
    Opcode.RELEASE_6: parse_reserve_release,
    Opcode.RESERVE_10: parse_reserve_release,
    Opcode.RELEASE_10: parse_reserve_release,
    Opcode.PERSISTENT_RESERVE_IN: parse_persistent_reserve_in,
    Opcode.PERSISTENT_RESERVE_OUT: parse_persistent_reserve_out,
    Opcode.READ_DEFECT_DATA_10: parse_read_defect_data,
    Opcode.READ_DEFECT_DATA_12: parse_read_defect_data,
    Opcode.EXTENDED_COPY: parse_extended_copy,
    Opcode.RECEIVE_COPY_RESULTS: parse_receive_copy_results,
    Opcode.READ_TOC_PMA_ATIP: parse_read_toc,
    Opcode.GET_CONFIGURATION: parse_get_configuration,
    Opcode.GET_EVENT_STATUS_NOTIFICATION: parse_get_event_status_notification,
    Opcode.MECHANISM_STATUS: parse_mechanism_status,
    **dict.fromkeys(RW_OPCODES, parse_rw),
}
_BY_SERVICE_ACTION: dict[tuple[int, int], Callable[[bytes], Any]] = {
    (0x9E, 0x10): parse_read_capacity16,
    (0x9E, 0x12): parse_get_lba_status,
    (0xA3, 0x0C): parse_report_supported_opcodes,
    (0xA3, 0x0D): parse_report_supported_tmfs,
    (0xA3, 0x0A): parse_report_target_port_groups,
}


def parse_cdb(cdb: bytes) -> Any:
    """Every parser of the codec, by operation code and service action, the
    way the target's dispatch tables reach them (errors included)."""
    if not cdb:
        raise CDBTooShort("empty CDB", field_offset=0)
    parser = _BY_OPCODE.get(cdb[0])
    if parser is not None:
        return parser(cdb)
    if cdb[0] in (0x9E, 0xA3):
        if len(cdb) < 2:
            raise CDBTooShort("short", field_offset=0)
        sa_parser = _BY_SERVICE_ACTION.get((cdb[0], cdb[1] & 0x1F))
        if sa_parser is None:
            raise InvalidCDBField("service action", field_offset=1, bit=4)
        return sa_parser(cdb)
    raise UnsupportedOpcode("unsupported", field_offset=0)


#: CDBs built by hand from the standards' tables and what they parse to:
#: the commands this stack receives but never sends.
VECTORS: list[tuple[str, Any]] = [
    ("03 01 00 00 c8 00", RequestSense(desc=True, allocation_length=200)),
    ("55 11 00 00 00 00 00 00 1c 00", ModeSelect(parameter_list_length=28, pf=True, sp=True, cdb_size=10)),
    ("15 10 00 00 0c 00", ModeSelect(parameter_list_length=12, pf=True, sp=False, cdb_size=6)),
    ("1b 01 00 00 06 00", StartStopUnit(start=False, loej=True, immed=True, no_flush=True)),
    ("1b 00 00 03 31 00", StartStopUnit(start=True, power_condition=3, power_condition_modifier=3)),
    ("1e 00 00 00 01 00", PreventAllowMediumRemoval(prevent=1)),
    ("a3 0c 82 9e 00 10 00 00 02 00 00 00", ReportSupportedOpcodes(
        reporting_options=2, requested_opcode=0x9E, requested_service_action=0x10, rctd=True,
        allocation_length=512)),
    ("a3 0d 80 00 00 00 00 00 00 10 00 00", ReportSupportedTMFs(repd=True, allocation_length=16)),
    ("a3 2a 00 00 00 00 00 00 04 00 00 00", ReportTargetPortGroups(parameter_data_format=1, allocation_length=1024)),
    ("83 00 00 00 00 00 00 00 00 00 00 00 00 60 00 00", ExtendedCopy(parameter_list_length=96)),
    ("84 03 07 00 00 00 00 00 00 00 00 00 04 00 00 00", ReceiveCopyResults(
        service_action=3, list_identifier=7, allocation_length=1024)),
    ("90 02 00 00 00 02 00 00 00 00 00 00 00 08 03 00", PreFetch(
        lba=1 << 33, blocks=8, immed=True, group=3, cdb_size=16)),
    ("34 02 00 00 00 10 00 00 04 00", PreFetch(lba=16, blocks=4, immed=True)),
    ("b7 15 00 00 00 02 00 00 00 08 00 00", ReadDefectData(
        req_plist=True, defect_list_format=5, allocation_length=8, address_descriptor_index=2, cdb_size=12)),
    ("37 00 0c 00 00 00 00 00 04 00", ReadDefectData(req_glist=True, defect_list_format=4, allocation_length=4)),
    ("43 02 01 00 00 00 aa 03 24 00", ReadToc(msf=True, toc_format=1, track_session_number=0xAA,
                                             allocation_length=804)),
    ("bd 00 00 00 00 00 00 00 00 08 00 00", MechanismStatus(allocation_length=8)),
    ("46 02 00 10 00 00 00 00 08 00", GetConfiguration(rt=2, starting_feature=0x10, allocation_length=8)),
    ("4a 01 00 00 10 00 00 00 08 00", GetEventStatusNotification(
        polled=True, notification_class_request=0x10, allocation_length=8)),
    ("57 00 00 00 00 00 00 00 00 00", ReserveRelease(release=True, cdb_size=10)),
    ("56 10 00 05 00 00 00 00 00 00", ReserveRelease(cdb_size=10, third_party=True, third_party_device_id=5)),
    ("16 00 00 00 00 00", ReserveRelease(release=False, cdb_size=6)),
    ("2f 02 00 00 00 05 00 00 0a 00", RWCommand(RWKind.VERIFY, 0x2F, 5, 10, bytchk=1)),
    ("8e 00 00 00 01 00 00 00 00 00 00 00 00 03 00 00", RWCommand(RWKind.WRITE_AND_VERIFY, 0x8E, 1 << 40, 3)),
    ("8b 08 00 00 00 00 00 00 00 07 00 00 00 02 00 00", RWCommand(RWKind.ORWRITE, 0x8B, 7, 2, fua=True)),
    ("28 06 00 00 00 00 00 00 01 00", RWCommand(RWKind.READ, 0x28, 0, 1, rarc=True, fua_nv=True)),
]


@pytest.mark.parametrize("raw, expected", VECTORS, ids=[v[0][:2] + "-" + str(i) for i, v in enumerate(VECTORS)])
def test_cdb_vectors(raw: str, expected: Any) -> None:
    cdb = bytes.fromhex(raw)
    assert parse_cdb(cdb) == expected
    for n in range(len(cdb)):
        with pytest.raises(CDBTooShort):
            parse_cdb(cdb[:n])


@pytest.mark.parametrize(
    "raw, offset, bit",
    [
        ("03 02 00 00 fc 00", 1, 1),  # REQUEST SENSE reserved bit
        ("12 04 00 00 60 00", 1, 2),  # INQUIRY reserved bit
        ("1a 10 3f 00 fc 00", 1, 4),  # MODE SENSE(6) reserved (LLBAA is 10-byte only)
        ("15 02 00 00 00 00", 1, 1),  # MODE SELECT reserved
        ("1b 02 00 00 01 00", 1, 1),  # START STOP UNIT reserved
        ("1b 00 00 00 08 00", 4, 3),  # START STOP UNIT reserved bit 3 of byte 4
        ("1e 00 00 00 04 00", 4, 2),  # PREVENT ALLOW reserved
        ("35 08 00 00 00 00 00 00 00 00", 1, 3),  # SYNCHRONIZE CACHE(10) reserved
        ("34 04 00 00 00 00 00 00 00 00", 1, 2),  # PRE-FETCH(10) reserved
        ("28 01 00 00 00 00 00 00 01 00", 1, 0),  # READ(10) reserved bit 0
        ("2a 04 00 00 00 00 00 00 01 00", 1, 2),  # WRITE(10) reserved bit 2
        ("2f 08 00 00 00 00 00 00 01 00", 1, 3),  # VERIFY(10) reserved bit 3
        ("41 02 00 00 00 00 00 00 01 00", 1, 1),  # WRITE SAME(10) obsolete LBDATA
        ("41 01 00 00 00 00 00 00 01 00", 1, 0),  # WRITE SAME(10) reserved bit 0
        ("89 04 00 00 00 00 00 00 00 00 00 00 00 01 00 00", 1, 2),  # COMPARE AND WRITE reserved
    ],
)
def test_reserved_bits_refused(raw: str, offset: int, bit: int) -> None:
    """Bits SBC-3/SPC-4 reserve are refused with a field pointer at the most
    significant one (SPC-4 §4.5.6, §4.5.2.4.2)."""
    e = _err(InvalidCDBField, parse_cdb, bytes.fromhex(raw))
    assert (e.field_offset, e.bit) == (offset, bit)


def test_cdb_error_is_the_check_condition() -> None:
    """One error type from codec to wire: a parser's refusal is the
    CHECK CONDITION the target answers, sense and field pointer included."""
    e = _err(InvalidCDBField, parse_inquiry, bytes.fromhex("12 02 00 00 60 00"))
    assert isinstance(e, CheckCondition) and isinstance(e, ValueError)
    assert (e.sense.key, e.sense.asc, e.sense.ascq) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0)
    assert (e.sense.field_pointer, e.sense.bit_pointer, e.sense.cd) == (1, 1, True)
    fixed = e.sense.encode_fixed()
    assert fixed[15:18] == e.sense_key_specific()
    plle = _err(ParameterListLengthError, parse_unmap, bytes.fromhex("42 00 00000000 00 0004 00"))
    assert plle.sense.asc == 0x1A and plle.sense.field_pointer is None


ROUND_TRIPS: list[
    tuple[Callable[..., bytes], Callable[[bytes], Any], st.SearchStrategy[Any]]
] = [
    (
        build_inquiry,
        parse_inquiry,
        st.one_of(
            st.builds(
                Inquiry, evpd=st.just(True), page_code=u8, allocation_length=u16
            ),
            st.builds(
                Inquiry,
                evpd=st.just(False),
                page_code=st.just(0),
                allocation_length=u16,
            ),
        ),
    ),
    (build_test_unit_ready, parse_test_unit_ready, st.just(TestUnitReady())),
    (
        build_report_luns,
        parse_report_luns,
        st.builds(
            ReportLuns,
            select_report=u8,
            allocation_length=st.integers(16, 0xFFFFFFFF),
        ),
    ),
    (
        build_read_capacity10,
        parse_read_capacity10,
        st.one_of(
            st.builds(ReadCapacity10, lba=u32, pmi=st.just(True)),
            st.just(ReadCapacity10(0, False)),
        ),
    ),
    (
        build_read_capacity16,
        parse_read_capacity16,
        st.one_of(
            st.builds(
                ReadCapacity16, allocation_length=u32, lba=u64, pmi=st.just(True)
            ),
            st.builds(
                ReadCapacity16,
                allocation_length=u32,
                lba=st.just(0),
                pmi=st.just(False),
            ),
        ),
    ),
    (
        build_get_lba_status,
        parse_get_lba_status,
        st.builds(GetLbaStatus, lba=u64, allocation_length=u32),
    ),
    (
        build_unmap,
        parse_unmap,
        st.builds(
            Unmap,
            parameter_list_length=st.one_of(st.just(0), st.integers(8, 0xFFFF)),
            anchor=b,
            group=st.integers(0, 63),
        ),
    ),
    (
        build_synchronize_cache,
        parse_synchronize_cache,
        _cache_range(SynchronizeCache),
    ),
    (
        build_mode_sense,
        parse_mode_sense,
        st.one_of(
            st.builds(
                ModeSense,
                page_code=st.integers(0, 63),
                subpage_code=u8,
                pc=st.integers(0, 3),
                dbd=b,
                llbaa=st.just(False),
                allocation_length=u8,
                cdb_size=st.just(6),
            ),
            st.builds(
                ModeSense,
                page_code=st.integers(0, 63),
                subpage_code=u8,
                pc=st.integers(0, 3),
                dbd=b,
                llbaa=b,
                allocation_length=u16,
                cdb_size=st.just(10),
            ),
        ),
    ),
    (
        build_persistent_reserve_in,
        parse_persistent_reserve_in,
        st.builds(
            PersistentReserveIn,
            service_action=st.sampled_from(list(PRInAction)),
            allocation_length=u16,
        ),
    ),
    (
        build_persistent_reserve_out,
        parse_persistent_reserve_out,
        st.builds(
            PersistentReserveOut,
            service_action=st.sampled_from(list(PROutAction)),
            scope=st.integers(0, 15),
            pr_type=st.integers(0, 15),
            parameter_list_length=u32,
        ).filter(_ok_pr_out),
    ),
]


@pytest.mark.parametrize(
    "builder, parser, strategy",
    ROUND_TRIPS,
    ids=[p.__name__ for _, p, _ in ROUND_TRIPS],
)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_cdb_round_trip(
    builder: Callable[..., bytes],
    parser: Callable[[bytes], Any],
    strategy: st.SearchStrategy[Any],
    data: st.DataObject,
) -> None:
    obj = data.draw(strategy)
    cdb = builder(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    assert len(cdb) == cdb_length(cdb[0])
    assert parser(cdb) == obj
    assert parse_cdb(cdb) == obj
    assert parser(memoryview(cdb)) == obj  # type: ignore[arg-type]  # zero-copy input accepted
    # Every truncation is a CDBTooShort, never IndexError/struct.error.
    for n in range(len(cdb)):
        with pytest.raises(CDBTooShort):
            parser(cdb[:n])


def _rw_strategy() -> st.SearchStrategy[RWCommand]:
    g = st.integers(0, 63)
    p = st.integers(0, 7)

    defaults: dict[str, Any] = {
        "dpo": False,
        "fua": False,
        "group": 0,
        "protect": 0,
        "bytchk": 0,
        "unmap": False,
        "anchor": False,
        "ndob": False,
        "rarc": False,
        "fua_nv": False,
    }

    def sized(
        op: int,
        kind: RWKind,
        lba_bits: int,
        len_bits: int,
        **kw: st.SearchStrategy[Any],
    ) -> st.SearchStrategy[RWCommand]:
        # Every field explicit: builds() would otherwise invent values for
        # fields the opcode cannot carry.
        fields = {k: kw.get(k, st.just(v)) for k, v in defaults.items()}
        return st.builds(
            RWCommand,
            st.just(kind),
            st.just(op),
            st.integers(0, (1 << lba_bits) - 1),
            st.integers(0, (1 << len_bits) - 1),
            **fields,
        )

    out: list[st.SearchStrategy[RWCommand]] = []
    for op, kind in ((Opcode.READ_6, RWKind.READ), (Opcode.WRITE_6, RWKind.WRITE)):
        out.append(
            st.builds(
                RWCommand,
                st.just(kind),
                st.just(op),
                st.integers(0, (1 << 21) - 1),
                st.integers(1, 256),
                **{k: st.just(v) for k, v in defaults.items()},
            )
        )
    for kind, ops in (
        (RWKind.READ, (Opcode.READ_10, Opcode.READ_12, Opcode.READ_16)),
        (RWKind.WRITE, (Opcode.WRITE_10, Opcode.WRITE_12, Opcode.WRITE_16)),
    ):
        rarc = b if kind is RWKind.READ else st.just(False)
        for op, (lb, lnb) in zip(ops, ((32, 16), (32, 32), (64, 32))):
            out.append(
                sized(op, kind, lb, lnb, dpo=b, fua=b, group=g, protect=p, rarc=rarc, fua_nv=b)
            )
    for kind, ops, bytchk in (
        (
            RWKind.VERIFY,
            (Opcode.VERIFY_10, Opcode.VERIFY_12, Opcode.VERIFY_16),
            st.sampled_from([0, 1, 3]),
        ),
        (
            RWKind.WRITE_AND_VERIFY,
            (
                Opcode.WRITE_AND_VERIFY_10,
                Opcode.WRITE_AND_VERIFY_12,
                Opcode.WRITE_AND_VERIFY_16,
            ),
            st.sampled_from([0, 1]),
        ),
    ):
        for op, (lb, lnb) in zip(ops, ((32, 16), (32, 32), (64, 32))):
            out.append(
                sized(op, kind, lb, lnb, dpo=b, group=g, protect=p, bytchk=bytchk)
            )
    unmap_anchor = st.sampled_from([(False, False), (True, False), (True, True)])
    out.append(
        unmap_anchor.flatmap(
            lambda ua: sized(
                Opcode.WRITE_SAME_10,
                RWKind.WRITE_SAME,
                32,
                16,
                group=g,
                protect=p,
                unmap=st.just(ua[0]),
                anchor=st.just(ua[1]),
            )
        )
    )
    out.append(
        unmap_anchor.flatmap(
            lambda ua: sized(
                Opcode.WRITE_SAME_16,
                RWKind.WRITE_SAME,
                64,
                32,
                group=g,
                protect=p,
                unmap=st.just(ua[0]),
                anchor=st.just(ua[1]),
                ndob=b,
            )
        )
    )
    out.append(
        sized(
            Opcode.COMPARE_AND_WRITE,
            RWKind.COMPARE_AND_WRITE,
            64,
            8,
            dpo=b,
            fua=b,
            group=g,
            protect=p,
        )
    )
    out.append(
        sized(
            Opcode.ORWRITE_16, RWKind.ORWRITE, 64, 32, dpo=b, fua=b, group=g, protect=p
        )
    )
    return st.one_of(out)


@settings(max_examples=400, deadline=None)
@given(_rw_strategy())
def test_rw_round_trip(cmd: RWCommand) -> None:
    cdb = build_rw(cmd)
    assert len(cdb) == (
        16 if cmd.opcode == Opcode.COMPARE_AND_WRITE else cdb_length(cmd.opcode)
    )
    assert parse_rw(cdb) == cmd
    assert parse_cdb(cdb) == cmd
    assert cdb[0] in RW_OPCODES
    for n in range(len(cdb)):
        with pytest.raises(CDBTooShort):
            parse_rw(cdb[:n])


def test_rw_convenience_builders() -> None:
    assert build_read(0, 1)[0] == Opcode.READ_10
    assert build_read(1 << 32, 1)[0] == Opcode.READ_16
    assert build_read(0, 1 << 16)[0] == Opcode.READ_16
    assert build_read(0, 1, size=12)[0] == Opcode.READ_12
    verify = RWCommand(RWKind.VERIFY, Opcode.VERIFY_10, 5, 10, bytchk=1)
    assert parse_rw(build_rw(verify)).data_out_blocks == 10
    assert parse_rw(build_rw(verify._replace(opcode=Opcode.VERIFY_16, bytchk=3))).data_out_blocks == 1
    assert parse_rw(build_rw(verify._replace(bytchk=3, blocks=0))).data_out_blocks == 0
    assert parse_rw(build_rw(verify._replace(bytchk=0))).data_out_blocks == 0
    wav = RWCommand(RWKind.WRITE_AND_VERIFY, Opcode.WRITE_AND_VERIFY_12, 5, 10)
    assert parse_rw(build_rw(wav)).data_out_blocks == 10
    assert parse_rw(build_write_same(5, 10)).data_out_blocks == 1
    assert build_write_same(0, 1, ndob=True)[0] == Opcode.WRITE_SAME_16
    bads: tuple[Callable[[], object], ...] = (
        lambda: build_write_same(0, 1, anchor=True),
        lambda: build_write_same(0, 1, ndob=True, size=10),
        lambda: build_rw(RWCommand(RWKind.VERIFY, Opcode.VERIFY_10, 0, 1, bytchk=2)),
        lambda: build_rw(RWCommand(RWKind.WRITE_AND_VERIFY, Opcode.WRITE_AND_VERIFY_10, 0, 1, bytchk=3)),
        lambda: build_rw(RWCommand(RWKind.WRITE, Opcode.WRITE_10, 0, 1, rarc=True)),
        lambda: build_read(0, 1 << 16, size=10),
        lambda: build_read(0, 1, group=64),
        lambda: build_read(0, 1, protect=8),
        lambda: build_read(0, 1, size=6, fua=True),
        lambda: build_compare_and_write(0, 256),
        lambda: build_rw(RWCommand(RWKind.WRITE, Opcode.READ_10, 0, 1)),
        lambda: build_rw(RWCommand(RWKind.READ, Opcode.INQUIRY, 0, 1)),
        lambda: build_rw(RWCommand(RWKind.READ, Opcode.READ_10, 0, 1, unmap=True)),
    )
    for bad in bads:
        with pytest.raises(ValueError):
            bad()


# --- error reporting (field pointers) ------------------------------------------


def _err(exc_type: type[CDBError], fn: Callable[[bytes], Any], cdb: bytes) -> CDBError:
    with pytest.raises(exc_type) as ei:
        fn(cdb)
    return ei.value


@pytest.mark.parametrize(
    "cdb, offset, bit",
    [
        (bytes.fromhex("12 00 83 0060 00"), 2, None),  # page code without EVPD
        (bytes.fromhex("12 02 00 0060 00"), 1, 1),  # CMDDT
        (
            bytes.fromhex("a0 00 00 000000 0000000f 00 00"),
            6,
            None,
        ),  # REPORT LUNS alloc < 16
        (bytes.fromhex("25 00 00000001 0000 00 00"), 2, None),  # RC10 LBA without PMI
        (bytes.fromhex("9e 10 0000000000000001 00000020 00 00"), 2, None),
        (
            bytes.fromhex("41 10 00000000 00 0001 00"),
            1,
            4,
        ),  # WRITE SAME ANCHOR w/o UNMAP
        (bytes.fromhex("2f 04 00000000 00 0001 00"), 1, 2),  # VERIFY BYTCHK=10b
        (bytes.fromhex("2e 06 00000000 00 0001 00"), 1, 2),  # W&V BYTCHK=11b
        (bytes.fromhex("5e 1f 0000000000 0010 00"), 1, 4),  # PR IN bad SA
        (bytes.fromhex("5f 1f 00 0000 00000018 00"), 1, 4),  # PR OUT bad SA
        (bytes.fromhex("5f 01 13 0000 00000018 00"), 2, 7),  # PR OUT scope != LU
        (bytes.fromhex("5f 01 02 0000 00000018 00"), 2, 3),  # PR OUT type 2 undefined
        (bytes.fromhex("a3 0c 04 00 0000 00001000 00 00"), 2, 2),  # RSOC options 4
        (bytes.fromhex("a3 0d 00 00 0000 00000003 00 00"), 6, None),  # RSTMF alloc < 4
        (bytes.fromhex("a3 4a 00 00 0000 00001000 00 00"), 1, 7),  # RTPG format 2
        (bytes.fromhex("16 01 00 0000 00"), 1, 0),  # RESERVE(6) extent
        (bytes.fromhex("57 01 00 00 000000 0000 00"), 1, 0),  # RELEASE(10) extent
        (bytes.fromhex("43 00 06 000000 00 0100 00"), 2, 3),  # READ TOC format 6
        (bytes.fromhex("46 03 0000 000000 0008 00"), 1, 1),  # GET CONFIGURATION RT=3
        (
            bytes.fromhex("9e 1f 0000000000000000 00000020 00 00"),
            1,
            4,
        ),  # unknown SAI(16) SA
        (
            bytes.fromhex("a3 1f 00 00 0000 00001000 00 00"),
            1,
            4,
        ),  # unknown MAINTENANCE IN SA
    ],
)
def test_invalid_field_pointer(cdb: bytes, offset: int, bit: int | None) -> None:
    e = _err(InvalidCDBField, parse_cdb, cdb)
    assert (e.field_offset, e.bit, e.in_cdb) == (offset, bit, True)
    assert (e.asc, e.ascq) == (0x24, 0x00)
    sks = e.sense_key_specific()
    assert sks[0] & 0xC0 == 0xC0  # SKSV, C/D=1
    assert bool(sks[0] & 0x08) == (bit is not None)
    if bit is not None:
        assert sks[0] & 7 == bit
    assert int.from_bytes(sks[1:], "big") == offset


def test_unsupported_opcode_and_short() -> None:
    e = _err(UnsupportedOpcode, parse_cdb, bytes.fromhex("c0 00 00 00 00 00"))
    assert (e.asc, e.field_offset) == (0x20, 0)
    _err(UnsupportedOpcode, parse_rw, build_inquiry())
    _err(CDBTooShort, parse_cdb, b"")
    _err(CDBTooShort, parse_rw, b"")
    _err(CDBTooShort, parse_cdb, b"\x9e")
    # A parser handed another command's CDB says so (field 0), not garbage.
    e = _err(CDBError, parse_inquiry, build_test_unit_ready())
    assert e.field_offset == 0 and "not a INQUIRY" in str(e)
    _err(CDBError, parse_read_capacity16, build_get_lba_status())


def test_parameter_list_errors() -> None:
    e = _err(
        ParameterListLengthError,
        parse_unmap,
        bytes.fromhex("42 00 00000000 00 0004 00"),
    )
    assert e.asc == 0x1A and e.sense_key_specific() == b"\x00\x00\x00"
    _err(ParameterListLengthError, parse_pr_out_parameters, bytes(23))
    _err(ParameterListLengthError, parse_pr_out_parameters, bytes(28))
    withspec = build_pr_out_parameters(
        reservation_key=1, spec_i_pt=True, additional=b"\x00\x00\x00\x00"
    )
    assert parse_pr_out_parameters(withspec).additional == b"\x00\x00\x00\x00"
    with pytest.raises(ValueError):
        build_pr_out_parameters(additional=b"x")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=20))
def test_parse_cdb_never_leaks(raw: bytes) -> None:
    try:
        parse_cdb(raw)
    except CDBError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(RW_OPCODES)), st.binary(min_size=15, max_size=15))
def test_parse_rw_arbitrary_bytes(op: int, rest: bytes) -> None:
    try:
        r = parse_rw(bytes([op]) + rest)
    except InvalidCDBField:
        return
    assert r.opcode == op and r.blocks >= 0


def test_cdb_length() -> None:
    assert cdb_length(0x00) == 6
    assert cdb_length(0x28) == 10
    assert cdb_length(0x5A) == 10
    assert cdb_length(0x88) == 16
    assert cdb_length(0xA0) == 12
    assert cdb_length(0xBF) == 12
    for op in (0x60, 0x7E, 0x7F, 0xC0, 0xFF):
        with pytest.raises(UnsupportedOpcode):
            cdb_length(op)
    with pytest.raises(ValueError):
        cdb_length(256)


# --- parameter lists and returned data -----------------------------------------


def test_unmap_parameter_list() -> None:
    descs = [(0, 8), (1 << 40, 0xFFFFFFFF)]
    data = build_unmap_parameter_list(descs)
    assert data[:8] == bytes.fromhex("0026 0020 00000000")
    assert parse_unmap_parameter_list(data) == tuple(
        UnmapDescriptor(*d) for d in descs
    )
    assert parse_unmap_parameter_list(b"") == ()
    assert parse_unmap_parameter_list(build_unmap_parameter_list([])) == ()
    with pytest.raises(ParameterListLengthError):
        parse_unmap_parameter_list(bytes(7))
    # Descriptor length not a multiple of 16: the partial one is ignored.
    odd = bytearray(data)
    odd[2:4] = (24).to_bytes(2, "big")
    assert parse_unmap_parameter_list(bytes(odd)) == (UnmapDescriptor(0, 8),)
    e = _err(ParameterListError, parse_unmap_parameter_list, data[:30])
    assert e.in_cdb is False and e.asc == 0x26 and e.sense_key_specific()[0] & 0x40 == 0


@given(st.lists(st.tuples(u64, u32), max_size=50))
def test_unmap_list_round_trip(descs: list[tuple[int, int]]) -> None:
    assert parse_unmap_parameter_list(build_unmap_parameter_list(descs)) == tuple(
        descs
    )


@given(
    st.lists(st.tuples(u64, u32, st.integers(0, 15)), max_size=30), st.integers(0, 40)
)
def test_lba_status_round_trip(descs: list[tuple[int, int, int]], cut: int) -> None:
    data = build_lba_status_data(descs)
    assert parse_lba_status_data(data) == tuple(descs)
    # Allocation length truncation: only whole descriptors come back.
    short = data[: max(8, len(data) - cut)]
    got = parse_lba_status_data(short)
    assert got == tuple(descs)[: (len(short) - 8) // 16]


def test_lba_status_short() -> None:
    with pytest.raises(SCSIDataError):
        parse_lba_status_data(bytes(7))


def test_read_capacity_data() -> None:
    d10 = parse_read_capacity10_data(bytes.fromhex("0001ffff 00000200"))
    assert (d10.last_lba, d10.block_length, d10.blocks, d10.needs_rc16) == (
        0x1FFFF,
        512,
        0x20000,
        False,
    )
    assert build_read_capacity10_data(1 << 40, 512)[:4] == b"\xff\xff\xff\xff"
    assert parse_read_capacity10_data(
        build_read_capacity10_data(1 << 40, 512)
    ).needs_rc16
    raw = bytes.fromhex(
        "00000000ffffffff"  # last LBA
        "00001000"  # 4096-byte blocks
        "05"  # P_TYPE=2 (bits 3-1), PROT_EN
        "33"  # P_I_EXPONENT=3, LBPPBE=3 (8 logical per physical)
        "c007"  # LBPME, LBPRZ, lowest aligned LBA 7
    ) + bytes(16)
    d16 = parse_read_capacity16_data(raw)
    assert d16 == ReadCapacity16Data(0xFFFFFFFF, 4096, True, 2, 3, 3, True, True, 7)
    assert d16.physical_block_length == 32768 and d16.blocks == 1 << 32
    assert build_read_capacity16_data(d16) == raw
    assert parse_read_capacity16_data(raw[:12]).lbpme is False  # short: tail reads 0
    with pytest.raises(SCSIDataError):
        parse_read_capacity16_data(raw[:11])
    with pytest.raises(SCSIDataError):
        parse_read_capacity10_data(b"\x00" * 7)


@given(
    st.builds(
        ReadCapacity16Data,
        last_lba=u64,
        block_length=u32,
        prot_en=b,
        p_type=st.integers(0, 7),
        p_i_exponent=st.integers(0, 15),
        lbppbe=st.integers(0, 15),
        lbpme=b,
        lbprz=b,
        lowest_aligned_lba=st.integers(0, 0x3FFF),
    )
)
def test_read_capacity16_round_trip(d: ReadCapacity16Data) -> None:
    assert parse_read_capacity16_data(build_read_capacity16_data(d)) == d


def test_luns() -> None:
    assert encode_lun(0) == bytes(8)
    assert encode_lun(5) == bytes.fromhex("0005000000000000")
    assert encode_lun(256) == bytes.fromhex("4100000000000000")
    assert encode_lun(16383) == bytes.fromhex("7fff000000000000")
    assert decode_lun(bytes.fromhex("4005000000000000")) == 5  # flat space
    with pytest.raises(ValueError):
        encode_lun(16384)
    for raw in (
        "c000000000000000",
        "8001000000000000",
        "0100000000000000",
        "0001000100000000",
    ):
        with pytest.raises(SCSIDataError, match="unsupported"):
            decode_lun(bytes.fromhex(raw))
    with pytest.raises(SCSIDataError):
        decode_lun(bytes(7))
    data = bytes.fromhex(
        "00000018 0000000000000000000000004101000000000000c000000000000000"
    )
    r = parse_report_luns_data(data)
    assert r.luns == (0, 257) and r.unsupported == (bytes.fromhex("c000000000000000"),)
    assert not r.truncated
    cut = parse_report_luns_data(data[:16])
    assert cut.luns == (0,) and cut.list_length == 24 and cut.truncated
    with pytest.raises(SCSIDataError):
        parse_report_luns_data(bytes(7))


@given(st.lists(st.integers(0, MAX_LUN), max_size=64))
def test_report_luns_round_trip(luns: list[int]) -> None:
    r = parse_report_luns_data(build_report_luns_data(luns))
    assert r.luns == tuple(luns) and r.list_length == 8 * len(luns) and not r.truncated
    for lun in luns:
        assert decode_lun(encode_lun(lun)) == lun


def test_standard_inquiry() -> None:
    raw = (
        bytes.fromhex(
            "00"  # qualifier 0, direct access
            "80"  # RMB
            "06"  # SPC-4
            "12"  # HISUP, response data format 2
            "1f"  # additional length 31
            "18"  # TPGS=1 (implicit ALUA), 3PC
            "10"  # MULTIP
            "02"  # CMDQUE
        )
        + b"LIO-ORG "
        + b"disk0           "
        + b"4.0 "
    )
    inq = parse_standard_inquiry(raw)
    assert inq == StandardInquiry(
        peripheral_type=0,
        qualifier=0,
        rmb=True,
        version=6,
        hisup=True,
        response_data_format=2,
        tpgs=1,
        three_pc=True,
        multip=True,
        cmdque=True,
        vendor="LIO-ORG",
        product="disk0",
        revision="4.0",
    )
    assert build_standard_inquiry(inq) == raw
    # Truncated to the header: text fields empty, no exception.
    assert parse_standard_inquiry(raw[:5]).vendor == ""
    with pytest.raises(SCSIDataError):
        parse_standard_inquiry(raw[:4])
    with pytest.raises(ValueError):
        build_standard_inquiry(StandardInquiry(vendor="TOO-LONG-VENDOR"))
    with_vd = StandardInquiry(vendor="AIO", version_descriptors=(0x0460, 0x0600))
    out = build_standard_inquiry(with_vd)
    assert len(out) == 74 and out[4] == 69
    assert parse_standard_inquiry(out) == with_vd


_text = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=8
)


@given(
    st.builds(
        StandardInquiry,
        peripheral_type=st.integers(0, 31),
        qualifier=st.integers(0, 7),
        rmb=b,
        version=u8,
        normaca=b,
        hisup=b,
        response_data_format=st.integers(0, 15),
        sccs=b,
        acc=b,
        tpgs=st.integers(0, 3),
        three_pc=b,
        protect=b,
        encserv=b,
        multip=b,
        cmdque=b,
        vendor=_text,
        product=_text,
        revision=_text.map(lambda s: s[:4]),
        version_descriptors=st.lists(st.integers(1, 0xFFFF), max_size=8).map(tuple),
    )
)
def test_standard_inquiry_round_trip(inq: StandardInquiry) -> None:
    assert parse_standard_inquiry(build_standard_inquiry(inq)) == inq


def test_vpd_pages() -> None:
    raw = build_vpd_supported_pages([0xB0, 0x00, 0x83, 0x80])
    assert raw == bytes.fromhex("00 00 0004 00 80 83 b0")
    assert parse_vpd_supported_pages(raw) == (0x00, 0x80, 0x83, 0xB0)
    with pytest.raises(SCSIDataError, match="expected"):
        parse_vpd_unit_serial(raw)
    with pytest.raises(SCSIDataError):
        parse_vpd_page(b"\x00\x00\x00")
    assert parse_vpd_unit_serial(build_vpd_unit_serial("SN123  ")) == "SN123"
    page = parse_vpd_page(raw[:6])
    assert page.truncated and page.payload == b"\x00\x80"

    designators = (
        Designator(
            DesignatorType.NAA, bytes.fromhex("6001405abcdef0123456789abcdef012")
        ),
        Designator(
            DesignatorType.T10_VENDOR_ID, b"LIO-ORG disk0", code_set=CodeSet.ASCII
        ),
        Designator(
            DesignatorType.SCSI_NAME_STRING,
            b"iqn.2026-11.org.aioiscsi:t,t,0x1\0\0\0\0",
            code_set=CodeSet.UTF8,
            association=Association.TARGET_PORT,
            protocol_identifier=PROTOCOL_ID_ISCSI,
            piv=True,
        ),
        Designator(
            DesignatorType.RELATIVE_TARGET_PORT,
            b"\x00\x00\x00\x01",
            association=Association.TARGET_PORT,
        ),
    )
    raw83 = build_vpd_device_identification(designators)
    assert raw83[4:8] == bytes.fromhex("01 03 00 10")
    assert parse_vpd_device_identification(raw83) == designators
    assert designators[2].text == "iqn.2026-11.org.aioiscsi:t,t,0x1"
    # Cut inside the second descriptor: only the first comes back.
    assert parse_vpd_device_identification(raw83[:30]) == designators[:1]

    bl = BlockLimits(
        wsnz=True,
        max_compare_and_write_length=1,
        optimal_transfer_length_granularity=8,
        max_transfer_length=2048,
        optimal_transfer_length=256,
        max_unmap_lba_count=0xFFFFFFFF,
        max_unmap_block_descriptor_count=64,
        optimal_unmap_granularity=8,
        ugavalid=True,
        unmap_granularity_alignment=0,
        max_write_same_length=1 << 20,
    )
    rawb0 = build_vpd_block_limits(bl)
    assert len(rawb0) == 64 and rawb0[1] == 0xB0 and rawb0[2:4] == b"\x00\x3c"
    assert parse_vpd_block_limits(rawb0) == bl
    old = build_vpd_page(0xB0, rawb0[4:20])  # an SBC-2 era 0x10-byte page
    assert parse_vpd_block_limits(old).max_unmap_lba_count == 0
    assert parse_vpd_block_limits(old).max_transfer_length == 2048

    bdc = build_vpd_block_device_characteristics(
        BlockDeviceCharacteristics(medium_rotation_rate=1, nominal_form_factor=3, wacereq=1, fuab=True)
    )
    assert bdc[:9] == bytes.fromhex("00 b1 003c 0001 00 13 02") and len(bdc) == 64

    lbp = LogicalBlockProvisioning(
        lbpu=True, lbpws=True, lbpws10=True, lbprz=1, provisioning_type=2
    )
    rawb2 = build_vpd_logical_block_provisioning(lbp)
    assert rawb2 == bytes.fromhex("00 b2 0004 00 e4 02 00")
    assert parse_vpd_logical_block_provisioning(rawb2) == lbp


def test_check_control() -> None:
    assert check_control(build_read(0, 1)) == 0
    cdb = bytearray(build_read(0, 1, size=16))
    cdb[15] = 0x04
    e = _err(InvalidCDBField, check_control, bytes(cdb))
    assert (e.field_offset, e.bit) == (15, 2)
    assert check_control(bytes(cdb), naca_supported=True) == 0x04
    _err(CDBTooShort, check_control, build_read(0, 1)[:9])
    _err(UnsupportedOpcode, check_control, b"\x7f" + bytes(31))


@given(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 32) - 1))
def test_plain_read_and_write_cdbs_match_the_general_encoder(lba: int, blocks: int) -> None:
    """build_read/build_write pack flag-less CDBs directly (the I/O path);
    they must equal what the general encoder makes of the same command."""
    from iscsi.scsi.rw import _pick

    for kind, build in ((RWKind.READ, build_read), (RWKind.WRITE, build_write)):
        op = _pick(kind, None, lba, blocks)
        assert build(lba, blocks) == build_rw(RWCommand(kind, op, lba, blocks))

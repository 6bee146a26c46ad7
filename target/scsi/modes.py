"""Mode pages (SPC-4 §7.5, SBC-3 §6.4, MMC-6 §7) with the four page-control
views (current, changeable, default, saved), MODE SENSE(6/10) data assembly
and MODE SELECT(6/10) parameter-list validation.

Pages are kept as whole byte strings including their 2-byte (or 4-byte for
subpages) header, so sensing is concatenation and selecting is a masked
compare against the changeable view.
"""

from __future__ import annotations

from dataclasses import dataclass

from iscsi.scsi.constants import ModePage
from iscsi.scsi.modes import (
    build_block_descriptor,
    build_mode_header,
    build_mode_page,
    parse_block_descriptors,
    parse_mode_header,
    split_mode_pages,
)
from iscsi.scsi.spc import ModeSense
from iscsi.scsi.sense import (
    PARAMETER_LIST_LENGTH_ERROR,
    SAVING_PARAMETERS_NOT_SUPPORTED,
    CheckCondition,
    illegal_request,
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
)

PC_CURRENT = 0
PC_CHANGEABLE = 1
PC_DEFAULT = 2
PC_SAVED = 3

#: MMC-6 §7.3: CD/DVD capabilities and mechanical status page.
CAPABILITIES_PAGE = 0x2A


@dataclass(frozen=True, slots=True)
class PageDef:
    """One mode page: its default contents and changeable mask (same length,
    header included; header bytes of the mask are zero)."""

    code: int
    subpage: int
    default: bytes
    changeable: bytes


def disk_pages(*, write_cache: bool) -> list[PageDef]:
    """The pages of a direct-access block device (SBC-3 §6.4)."""
    caching = bytearray(build_mode_page(ModePage.CACHING, bytes(0x12)))
    if write_cache:
        caching[2] |= 0x04  # WCE: writes complete before reaching the medium
    caching_mask = bytearray(len(caching))
    caching_mask[2] = 0x04
    control = bytearray(build_mode_page(ModePage.CONTROL, bytes(0x0A)))
    control[2] = 0x02  # GLTSD: no implicit log parameter saving
    control[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
    control[8:10] = b"\xff\xff"  # BUSY TIMEOUT PERIOD: unlimited
    control_mask = bytearray(len(control))
    control_mask[2] = 0x04  # D_SENSE
    control_mask[4] = 0x08  # SWP
    iec = bytearray(build_mode_page(ModePage.INFORMATIONAL_EXCEPTIONS, bytes(0x0A)))
    iec[2] = 0x08  # DEXCPT: informational exceptions reporting disabled
    iec_mask = bytearray(len(iec))
    iec_mask[2] = 0x08
    rwer = build_mode_page(ModePage.READ_WRITE_ERROR_RECOVERY, bytes(0x0A))
    disc = build_mode_page(ModePage.DISCONNECT_RECONNECT, bytes(0x0E))
    return [
        PageDef(ModePage.READ_WRITE_ERROR_RECOVERY, 0, rwer, bytes(len(rwer))),
        PageDef(ModePage.DISCONNECT_RECONNECT, 0, disc, bytes(len(disc))),
        PageDef(ModePage.CACHING, 0, bytes(caching), bytes(caching_mask)),
        PageDef(ModePage.CONTROL, 0, bytes(control), bytes(control_mask)),
        PageDef(ModePage.INFORMATIONAL_EXCEPTIONS, 0, bytes(iec), bytes(iec_mask)),
    ]


def cdrom_pages() -> list[PageDef]:
    """The pages of an MMC CD/DVD device: error recovery, control,
    informational exceptions and the capabilities page 2Ah."""
    base = [p for p in disk_pages(write_cache=False) if p.code != ModePage.CACHING]
    caps = bytearray(build_mode_page(CAPABILITIES_PAGE, bytes(0x14)))
    caps[2] = 0x3B  # reads CD-R, CD-RW, method 2, DVD-ROM, DVD-R
    caps[6] = 0x29  # LOCK, EJECT, loading mechanism: tray (001b)
    caps_page = bytes(caps)
    return base + [PageDef(CAPABILITIES_PAGE, 0, caps_page, bytes(len(caps_page)))]


class ModePages:
    """The mode pages of one logical unit with all four views."""

    def __init__(self, pages: list[PageDef]) -> None:
        self._defs = {(p.code, p.subpage): p for p in pages}
        self._order = sorted(self._defs)
        self.current: dict[tuple[int, int], bytearray] = {k: bytearray(p.default) for k, p in self._defs.items()}
        self.saved: dict[tuple[int, int], bytes] = {k: p.default for k, p in self._defs.items()}

    def has(self, code: int, subpage: int = 0) -> bool:
        """True when the page exists."""
        return (code, subpage) in self._defs

    def bit(self, code: int, offset: int, mask: int) -> bool:
        """A bit of the current value of a page (False if page absent)."""
        page = self.current.get((code, 0))
        return bool(page is not None and page[offset] & mask)

    def set_bit(self, code: int, offset: int, mask: int, value: bool) -> None:
        """Change a bit of the current value (internal state changes)."""
        page = self.current[(code, 0)]
        page[offset] = (page[offset] | mask) if value else (page[offset] & ~mask)

    def _view(self, key: tuple[int, int], pc: int) -> bytes:
        d = self._defs[key]
        if pc == PC_CURRENT:
            return bytes(self.current[key])
        if pc == PC_CHANGEABLE:
            # SPC-4 §7.5.7: the changeable view masks the parameters only;
            # the page code (and subpage) and page length are reported as
            # in the other views, or the initiator cannot tell whose mask
            # it is (libiscsi's set_swp read a zero page code as "SWP not
            # changeable").
            head = 4 if d.default[0] & 0x40 else 2  # SPF: sub_page format
            return d.default[:head] + d.changeable[head:]
        if pc == PC_DEFAULT:
            return d.default
        return self.saved[key]

    def sense_pages(self, code: int, subpage: int, pc: int) -> bytes:
        """The pages MODE SENSE asks for (SPC-4 §6.11: page 3Fh = all,
        subpage FFh = all subpages). Raises INVALID FIELD IN CDB (byte 2 /
        byte 3) for pages or subpages we do not have."""
        if code == ModePage.ALL_PAGES:
            if subpage == 0x00:
                keys = [k for k in self._order if k[1] == 0]
            elif subpage == 0xFF:
                keys = list(self._order)
            else:
                raise invalid_field_in_cdb(3)
        elif subpage == 0xFF:
            keys = [k for k in self._order if k[0] == code]
            if not keys:
                raise invalid_field_in_cdb(2, 5)
        else:
            if (code, subpage) not in self._defs:
                if any(k[0] == code for k in self._order):
                    raise invalid_field_in_cdb(3)
                raise invalid_field_in_cdb(2, 5)
            keys = [(code, subpage)]
        return b"".join(self._view(k, pc) for k in keys)

    def select(self, pages: memoryview, *, save: bool, base: int) -> bool:
        """Apply the mode pages of a MODE SELECT parameter list.

        All pages are validated before any is applied, so a rejected list
        changes nothing. ``base`` is the offset of ``pages`` in the whole
        parameter list, for field pointers. Returns True when a current
        value changed.
        """
        updates: list[tuple[tuple[int, int], bytes]] = []
        total = len(pages)
        for span in split_mode_pages(pages):
            pos, plen, hdr = span.offset, span.length, span.header
            key = (span.code, span.subpage)
            d = self._defs.get(key)
            if d is None:
                raise invalid_field_in_parameter_list(base + pos, 5)
            if plen != len(d.default):
                raise invalid_field_in_parameter_list(base + pos + 1)
            if pos + plen > total:
                raise illegal_request(PARAMETER_LIST_LENGTH_ERROR)
            new = bytes(pages[pos : pos + plen])
            cur = self.current[key]
            mask = d.changeable
            diff = int.from_bytes(new[hdr:], "big") ^ int.from_bytes(cur[hdr:], "big")
            forbidden = diff & ~int.from_bytes(mask[hdr:], "big")
            if forbidden:
                # point at the first offending byte (most significant set byte)
                nbytes = plen - hdr
                first = nbytes - 1 - (forbidden.bit_length() - 1) // 8
                raise invalid_field_in_parameter_list(base + pos + hdr + first)
            updates.append((key, new))
        changed = False
        for key, new in updates:
            cur = self.current[key]
            hdr = 4 if self._defs[key].subpage else 2
            merged = bytes(cur[:hdr]) + new[hdr:]
            if merged != bytes(cur):
                changed = True
            self.current[key] = bytearray(merged)
            if save:
                self.saved[key] = merged
        return changed

    def reset_to_saved(self) -> None:
        """Current values revert to saved ones (power on / LU reset,
        SPC-4 §7.5.1)."""
        for key, val in self.saved.items():
            self.current[key] = bytearray(val)


def mode_sense(
    cmd: ModeSense,
    pages: ModePages,
    *,
    num_blocks: int,
    block_size: int,
    device_specific: int,
    block_descriptors: bool = True,
) -> bytes:
    """Full MODE SENSE(6) or (10) data (SPC-4 §7.5.4–§7.5.6), before
    truncation to the allocation length."""
    ten = cmd.cdb_size == 10
    dbd, llbaa, pc = cmd.dbd, cmd.llbaa, cmd.pc
    code, subpage = cmd.page_code, cmd.subpage_code
    if pc == PC_SAVED and not pages.saved:
        raise illegal_request(SAVING_PARAMETERS_NOT_SUPPORTED)
    body = pages.sense_pages(code, subpage, pc)
    bd = b""
    if not dbd and block_descriptors:
        bd = build_block_descriptor(num_blocks, block_size, long=llbaa)
    hdr = build_mode_header(ten=ten, data_length=len(bd) + len(body),
                            device_specific=device_specific, longlba=bool(llbaa and bd),
                            block_descriptor_length=len(bd))
    return hdr + bd + body


def parse_mode_select(
    data: memoryview, *, ten: bool, num_blocks: int, block_size: int
) -> tuple[memoryview, int]:
    """Check the header and block descriptors of a MODE SELECT parameter
    list (SPC-4 §7.5.4); return the mode pages and their offset."""
    header = parse_mode_header(data, ten=ten)
    for pos, nb, bl in parse_block_descriptors(data, header):
        # We cannot reformat: the block length must stay, and the number of
        # blocks may only be 0 (unchanged) or the current capacity.
        if bl not in (0, block_size):
            raise invalid_field_in_parameter_list(pos + (12 if header.longlba else 5))
        if nb not in (0, num_blocks, min(num_blocks, 0xFFFFFFFF)):
            raise invalid_field_in_parameter_list(pos)
    pos = header.size + header.block_descriptor_length
    return data[pos:], pos


__all__ = [
    "PC_CHANGEABLE",
    "PC_CURRENT",
    "PC_DEFAULT",
    "PC_SAVED",
    "CheckCondition",
    "ModePages",
    "PageDef",
    "cdrom_pages",
    "disk_pages",
    "mode_sense",
    "parse_mode_select",
]

//! The guest side: the hand-assembled guest program, the low-slot layout and its page tables, and
//! the host-side twin of the guest's checksum.
//!
//! # Low slot layout (slot 0, VMM-private anonymous memory at GPA 0)
//!
//! | GPA                          | contents                                              |
//! |------------------------------|-------------------------------------------------------|
//! | `0x0000`                     | unused                                                |
//! | [`CODE_GPA`] `0x1000`        | the guest program ([`PROGRAM`])                       |
//! | [`PML4_GPA`] `0x2000`        | PML4: entry 0 -> PDPT                                 |
//! | [`PDPT_GPA`] `0x3000`        | PDPT: entry `i` -> PD `i` (one per GiB mapped)        |
//! | [`PD_BASE_GPA`] `0x4000 + i * 0x1000` | PD `i`: 512 × 2 MiB pages identity-mapping GiB `i` |
//!
//! A single PDPT covers 512 GiB, so at most 512 PDs: the low slot is at most
//! `0x4000 + 512 * 0x1000` = 2 MiB + 16 KiB, always well below [`super::RefVm::MIN_REGION_GPA`]
//! (1 GiB), where the caller's regions start. Every PDE is `P|RW|US|PS` (2 MiB, user, writable),
//! so the whole range `[0, round_up(highest region end, 1 GiB))` is identity-mapped for ring 3.
//! GPAs between slots are mapped in the guest page tables but backed by no memslot; the program
//! never touches them (the VMM checks every task lies inside one region).
//!
//! # The guest program
//!
//! Runs at CPL 3 in 64-bit long mode with IOPL 3 (so `out` is allowed; `hlt` would fault), which is
//! what this host's PVM backend runs natively. Inputs (set with `KVM_SET_REGS` before each task):
//! `rdi` = first GPA, `rsi` = end GPA (exclusive), `rbx` = workload selector
//! ([`SEL_CHECKSUM`], [`SEL_PATTERN`], [`SEL_TOUCH`], [`SEL_SCATTER`]), `rdx` = pattern key (or
//! the scatter stride in bytes), `r8` = pages a scatter visits. It runs the workload
//! over `[rdi, rsi)` and reports with `out 0x10, al` ([`DONE_PORT`]), the result in `rax` (checksum,
//! or 0). An unknown selector reports on `out 0x11, al` ([`BAD_SELECTOR_PORT`]); the VMM treats
//! that as an error and never resumes the guest after either `out`. No stack is used.
//!
//! Source (`as --64`, Intel syntax), assembled with binutils `as` and checked with `objdump -d`:
//!
//! ```text
//!     .intel_syntax noprefix
//!     .code64
//! start:
//!     xor   eax, eax              # 00: 31 c0
//!     cmp   rdi, rsi              # 02: 48 39 f7
//!     jae   done                  # 05: 73 4b        empty range: result 0
//!     test  rbx, rbx              # 07: 48 85 db
//!     jz    checksum              # 0a: 74 0e
//!     cmp   rbx, 1                # 0c: 48 83 fb 01
//!     je    pattern               # 10: 74 1a
//!     cmp   rbx, 2                # 12: 48 83 fb 02
//!     je    touch                 # 16: 74 2b
//!     jmp   more                  # 18: eb 3a
//! checksum:                       # h = rotl(h, 7) ^ word, for each 8-byte word in order
//!     rol   rax, 7                # 1a: 48 c1 c0 07
//!     xor   rax, [rdi]            # 1e: 48 33 07
//!     add   rdi, 8                # 21: 48 83 c7 08
//!     cmp   rdi, rsi              # 25: 48 39 f7
//!     jb    checksum              # 28: 72 f0
//!     jmp   done                  # 2a: eb 26
//! pattern:                        # qword [page] = page_gpa ^ key, once per 4 KiB page
//!     mov   rcx, rdi              # 2c: 48 89 f9
//!     xor   rcx, rdx              # 2f: 48 31 d1
//!     mov   [rdi], rcx            # 32: 48 89 0f
//!     add   rdi, 4096             # 35: 48 81 c7 00 10 00 00
//!     cmp   rdi, rsi              # 3c: 48 39 f7
//!     jb    pattern               # 3f: 72 eb
//!     jmp   done                  # 41: eb 0f
//! touch:                          # byte [page] = 1, once per 4 KiB page
//!     mov   byte ptr [rdi], 1     # 43: c6 07 01
//!     add   rdi, 4096             # 46: 48 81 c7 00 10 00 00
//!     cmp   rdi, rsi              # 4d: 48 39 f7
//!     jb    touch                 # 50: 72 f1
//! done:
//!     out   0x10, al              # 52: e6 10        result in rax
//! more:
//!     cmp   rbx, 3                # 54: 48 83 fb 03
//!     jne   bad                   # 58: 75 24
//!     mov   rcx, rsi              # 5a: 48 89 f1     scatter: mask = (rsi - rdi) - 1
//!     sub   rcx, rdi              # 5d: 48 29 f9
//!     dec   rcx                   # 60: 48 ff c9
//!     xor   r9d, r9d              # 63: 45 31 c9     offset = 0
//! scatter:                        # r8 times: h = rotl(h, 7) ^ [rdi + offset]
//!     test  r8, r8                # 66: 4d 85 c0
//!     jz    done                  # 69: 74 e7
//!     rol   rax, 7                # 6b: 48 c1 c0 07
//!     xor   rax, [rdi + r9]       # 6f: 4a 33 04 0f
//!     add   r9, rdx               # 73: 49 01 d1     offset = (offset + stride) & mask
//!     and   r9, rcx               # 76: 49 21 c9
//!     dec   r8                    # 79: 49 ff c8
//!     jmp   scatter               # 7c: eb e8
//! bad:
//!     out   0x11, al              # 7e: e6 11        unknown selector (VMM stops here)
//! ```

/// GPA of the guest program (also its entry point).
pub const CODE_GPA: u64 = 0x1000;
/// GPA of the PML4 (loaded into CR3).
pub const PML4_GPA: u64 = 0x2000;
/// GPA of the single PDPT.
pub const PDPT_GPA: u64 = 0x3000;
/// GPA of the first page directory; PD `i` (mapping GiB `i`) is at `PD_BASE_GPA + i * 4 KiB`.
pub const PD_BASE_GPA: u64 = 0x4000;
/// Port of the `out` that ends a task.
pub const DONE_PORT: u16 = 0x10;
/// Port of the `out` that reports an unknown workload selector.
pub const BAD_SELECTOR_PORT: u16 = 0x11;
/// `rbx` value selecting the checksum workload.
pub const SEL_CHECKSUM: u64 = 0;
/// `rbx` value selecting the write-pattern workload.
pub const SEL_PATTERN: u64 = 1;
/// `rbx` value selecting the touch workload.
pub const SEL_TOUCH: u64 = 2;
/// `rbx` value selecting the scatter workload.
pub const SEL_SCATTER: u64 = 3;

/// 4 KiB.
pub const PAGE_SIZE: u64 = 4096;
/// 2 MiB, the size of every guest page.
pub const HUGE_PAGE: u64 = 2 << 20;
/// 1 GiB, the span of one page directory.
pub const GIB: u64 = 1 << 30;
/// Page directories one PDPT can point to (so at most 512 GiB of identity map).
pub const MAX_PDS: u64 = 512;

/// The assembled guest program (see the module docs for the source).
pub const PROGRAM: [u8; 0x80] = [
    0x31, 0xc0, // xor eax, eax
    0x48, 0x39, 0xf7, // cmp rdi, rsi
    0x73, 0x4b, // jae done
    0x48, 0x85, 0xdb, // test rbx, rbx
    0x74, 0x0e, // jz checksum
    0x48, 0x83, 0xfb, 0x01, // cmp rbx, 1
    0x74, 0x1a, // je pattern
    0x48, 0x83, 0xfb, 0x02, // cmp rbx, 2
    0x74, 0x2b, // je touch
    0xeb, 0x3a, // jmp more
    // checksum (0x1a):
    0x48, 0xc1, 0xc0, 0x07, // rol rax, 7
    0x48, 0x33, 0x07, // xor rax, [rdi]
    0x48, 0x83, 0xc7, 0x08, // add rdi, 8
    0x48, 0x39, 0xf7, // cmp rdi, rsi
    0x72, 0xf0, // jb checksum
    0xeb, 0x26, // jmp done
    // pattern (0x2c):
    0x48, 0x89, 0xf9, // mov rcx, rdi
    0x48, 0x31, 0xd1, // xor rcx, rdx
    0x48, 0x89, 0x0f, // mov [rdi], rcx
    0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add rdi, 4096
    0x48, 0x39, 0xf7, // cmp rdi, rsi
    0x72, 0xeb, // jb pattern
    0xeb, 0x0f, // jmp done
    // touch (0x43):
    0xc6, 0x07, 0x01, // mov byte ptr [rdi], 1
    0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add rdi, 4096
    0x48, 0x39, 0xf7, // cmp rdi, rsi
    0x72, 0xf1, // jb touch
    // done (0x52):
    0xe6, 0x10, // out 0x10, al
    // more (0x54):
    0x48, 0x83, 0xfb, 0x03, // cmp rbx, 3
    0x75, 0x24, // jne bad
    0x48, 0x89, 0xf1, // mov rcx, rsi
    0x48, 0x29, 0xf9, // sub rcx, rdi
    0x48, 0xff, 0xc9, // dec rcx
    0x45, 0x31, 0xc9, // xor r9d, r9d
    // scatter (0x66):
    0x4d, 0x85, 0xc0, // test r8, r8
    0x74, 0xe7, // jz done
    0x48, 0xc1, 0xc0, 0x07, // rol rax, 7
    0x4a, 0x33, 0x04, 0x0f, // xor rax, [rdi + r9]
    0x49, 0x01, 0xd1, // add r9, rdx
    0x49, 0x21, 0xc9, // and r9, rcx
    0x49, 0xff, 0xc8, // dec r8
    0xeb, 0xe8, // jmp scatter
    // bad (0x7e):
    0xe6, 0x11, // out 0x11, al
];

/// Page-table entry flags: present, writable, user.
const PTE_P_RW_US: u64 = 0b111;
/// Page-size bit in a PDE (2 MiB page).
const PDE_PS: u64 = 1 << 7;

/// Number of page directories needed to identity-map `[0, end)` (whole GiBs).
pub fn pds_for(end: u64) -> u64 {
    end.div_ceil(GIB).max(1)
}

/// Size in bytes of the low slot holding the code and `pds` page directories.
pub fn low_slot_len(pds: u64) -> u64 {
    PD_BASE_GPA + pds * PAGE_SIZE
}

/// Writes the program and the identity page tables (`pds` GiB of 2 MiB pages) into `low`, the
/// host view of the low slot (GPA 0). `low` must be zeroed and exactly `low_slot_len(pds)` long.
pub fn build_low_slot(low: &mut [u8], pds: u64) {
    debug_assert!((1..=MAX_PDS).contains(&pds));
    debug_assert_eq!(low.len() as u64, low_slot_len(pds));
    let code = CODE_GPA as usize;
    low[code..code + PROGRAM.len()].copy_from_slice(&PROGRAM);
    put_u64(low, PML4_GPA, PDPT_GPA | PTE_P_RW_US);
    for gib in 0..pds {
        let pd = PD_BASE_GPA + gib * PAGE_SIZE;
        put_u64(low, PDPT_GPA + gib * 8, pd | PTE_P_RW_US);
        for i in 0..512u64 {
            let page = gib * GIB + i * HUGE_PAGE;
            put_u64(low, pd + i * 8, page | PDE_PS | PTE_P_RW_US);
        }
    }
}

fn put_u64(buf: &mut [u8], at: u64, value: u64) {
    let at = at as usize;
    buf[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

/// Host-side equivalent of the guest's checksum over `bytes`: `h = 0`, then for each 8-byte
/// little-endian word `w` in address order, `h = h.rotate_left(7) ^ w`.
///
/// `bytes.len()` should be a multiple of 8; trailing bytes past the last whole word are ignored
/// (the guest only ever checksums whole pages).
pub fn checksum_words(bytes: &[u8]) -> u64 {
    debug_assert_eq!(
        bytes.len() % 8,
        0,
        "checksum_words needs whole 8-byte words"
    );
    bytes.chunks_exact(8).fold(0u64, |h, w| {
        let mut word = [0u8; 8];
        word.copy_from_slice(w);
        h.rotate_left(7) ^ u64::from_le_bytes(word)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jump_targets_match_labels() {
        // rel8 targets: (offset of the jump's displacement byte, expected target)
        let jumps = [
            (0x06, 0x52),
            (0x0b, 0x1a),
            (0x11, 0x2c),
            (0x17, 0x43),
            (0x29, 0x1a),
            (0x2b, 0x52),
            (0x40, 0x2c),
            (0x42, 0x52),
            (0x51, 0x43),
            (0x19, 0x54),
            (0x59, 0x7e),
            (0x6a, 0x52),
            (0x7d, 0x66),
        ];
        for (disp_at, target) in jumps {
            let next = disp_at as i64 + 1;
            let rel = PROGRAM[disp_at] as i8 as i64;
            assert_eq!(next + rel, target, "jump displacement at {disp_at:#x}");
        }
        assert_eq!(&PROGRAM[0x52..0x54], &[0xe6, DONE_PORT as u8]);
        assert_eq!(&PROGRAM[0x7e..], &[0xe6, BAD_SELECTOR_PORT as u8]);
    }

    #[test]
    fn page_tables_identity_map() {
        let pds = 3;
        let mut low = vec![0u8; low_slot_len(pds) as usize];
        build_low_slot(&mut low, pds);
        let get = |at: u64| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&low[at as usize..at as usize + 8]);
            u64::from_le_bytes(w)
        };
        assert_eq!(get(PML4_GPA), PDPT_GPA | 7);
        assert_eq!(get(PDPT_GPA + 2 * 8), (PD_BASE_GPA + 2 * PAGE_SIZE) | 7);
        assert_eq!(get(PDPT_GPA + 3 * 8), 0);
        assert_eq!(
            get(PD_BASE_GPA + 2 * PAGE_SIZE + 511 * 8),
            (3 * GIB - HUGE_PAGE) | 0x87
        );
    }

    #[test]
    fn checksum_reference_values() {
        assert_eq!(checksum_words(&[]), 0);
        let mut b = [0u8; 16];
        b[0] = 1;
        b[8] = 2;
        assert_eq!(checksum_words(&b), (1u64 << 7) ^ 2);
    }
}

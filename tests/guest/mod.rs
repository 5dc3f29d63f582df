//! The tiny test guest: `tiny_guest.S` assembled and linked at test time (binutils `as` + `ld`)
//! into an ELF64 that real Firecracker boots as `kernel_image_path`. It prints
//! `banger-guest: ready boot_id=<16 hex digits>` on the serial console and resets through the
//! i8042 on SendCtrlAltDel. `tiny_guest_flood.S` ([`build_flood_guest`]) prints the same line and
//! then floods its serial port forever (still resetting on SendCtrlAltDel). [`configure`] sets a
//! VMM up to boot either. Include from an integration test with
//! `#[path = "guest/mod.rs"] mod guest;`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use banger::error::{Context, Error, Result};

/// The assembly source.
pub const SOURCE: &str = include_str!("tiny_guest.S");
/// The flooding variant's assembly source.
pub const FLOOD_SOURCE: &str = include_str!("tiny_guest_flood.S");
/// The line the flooding guest repeats (the stand-in recognises its image by it).
pub const FLOOD_LINE: &str = "banger-guest: flood 0123456789abcdefghijklmnopqrstuvwxyz\n";
/// How the readiness line starts (what an image's `--ready-console` waits for).
pub const READY: &str = "banger-guest: ready boot_id=";
/// The linker script (load address 1 MiB, one PT_LOAD).
pub const LINKER_SCRIPT: &str = include_str!("tiny_guest.ld");

/// Firecracker refuses kernel segments below this physical address (HIMEM_START).
pub const HIMEM_START: u64 = 0x10_0000;

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().map_err(|e| {
        Error::new(format!("running {what}"), e)
            .hint("install binutils (as, ld) to build the tiny guest")
    })?;
    if !out.status.success() {
        return Err(Error::new(
            format!("running {what}"),
            format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// Assembles and links the tiny guest into `dir/tiny-guest.elf`, checks it is an ELF Firecracker
/// can load, and returns its path.
pub fn build_tiny_guest(dir: &Path) -> Result<PathBuf> {
    build(dir, "tiny_guest", SOURCE)
}

/// Assembles and links the flooding guest into `dir/tiny_guest_flood.elf` (same checks).
pub fn build_flood_guest(dir: &Path) -> Result<PathBuf> {
    build(dir, "tiny_guest_flood", FLOOD_SOURCE)
}

/// Configures the VMM behind `api` to boot `kernel` with `boot_args` on the machine every test
/// guest boots on: 1 vCPU, 128 MiB.
pub fn configure(api: &banger::vmm::api::Client, kernel: &Path, boot_args: &str) {
    use banger::vmm::models::{BootSource, MachineConfiguration};
    api.put_boot_source(&BootSource {
        kernel_image_path: kernel.to_path_buf(),
        boot_args: Some(boot_args.into()),
        initrd_path: None,
    })
    .unwrap();
    api.put_machine_config(&MachineConfiguration {
        vcpu_count: 1,
        mem_size_mib: 128,
        smt: None,
        track_dirty_pages: None,
        cpu_template: None,
        huge_pages: None,
    })
    .unwrap();
}

fn build(dir: &Path, name: &str, source: &str) -> Result<PathBuf> {
    let src = dir.join(format!("{name}.S"));
    let ld_script = dir.join("tiny_guest.ld");
    let obj = dir.join(format!("{name}.o"));
    let elf = if name == "tiny_guest" {
        dir.join("tiny-guest.elf")
    } else {
        dir.join(format!("{name}.elf"))
    };
    std::fs::write(&src, source).ctx(|| format!("writing {}", src.display()))?;
    std::fs::write(&ld_script, LINKER_SCRIPT).ctx(|| format!("writing {}", ld_script.display()))?;
    run(
        Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&src),
        "as (assembling the tiny guest)",
    )?;
    run(
        Command::new("ld")
            .args(["-m", "elf_x86_64", "-static", "-nostdlib", "-T"])
            .arg(&ld_script)
            .arg("-o")
            .arg(&elf)
            .arg(&obj),
        "ld (linking the tiny guest)",
    )?;
    let bytes = std::fs::read(&elf).ctx(|| format!("reading {}", elf.display()))?;
    check_loadable_elf(&bytes)
        .map_err(|why| Error::new(format!("checking {}", elf.display()), why))?;
    Ok(elf)
}

fn u16_at(b: &[u8], off: usize) -> std::result::Result<u16, String> {
    b.get(off..off + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_le_bytes)
        .ok_or_else(|| format!("truncated at {off}"))
}

fn u32_at(b: &[u8], off: usize) -> std::result::Result<u32, String> {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| format!("truncated at {off}"))
}

fn u64_at(b: &[u8], off: usize) -> std::result::Result<u64, String> {
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| format!("truncated at {off}"))
}

/// What Firecracker's ELF loader (linux-loader) insists on: ELF magic, 64-bit little-endian,
/// x86_64, an executable, and every PT_LOAD segment at or above [`HIMEM_START`] with the entry
/// point inside one of them. Returns the entry point.
pub fn check_loadable_elf(b: &[u8]) -> std::result::Result<u64, String> {
    if !b.starts_with(b"\x7fELF") {
        return Err("no ELF magic".into());
    }
    if b.get(4) != Some(&2) || b.get(5) != Some(&1) {
        return Err("not ELF64 little-endian".into());
    }
    if u16_at(b, 16)? != 2 {
        return Err("not an executable (ET_EXEC)".into());
    }
    if u16_at(b, 18)? != 62 {
        return Err("not x86_64 (EM_X86_64)".into());
    }
    let entry = u64_at(b, 24)?;
    let phoff = u64_at(b, 32)? as usize;
    let phentsize = u16_at(b, 54)? as usize;
    let phnum = u16_at(b, 56)? as usize;
    let mut loads = 0;
    let mut entry_inside = false;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(b, ph)? != 1 {
            continue; // not PT_LOAD
        }
        loads += 1;
        let paddr = u64_at(b, ph + 24)?;
        let memsz = u64_at(b, ph + 40)?;
        if paddr < HIMEM_START {
            return Err(format!("PT_LOAD at {paddr:#x}, below {HIMEM_START:#x}"));
        }
        entry_inside |= (paddr..paddr + memsz).contains(&entry);
    }
    if loads == 0 {
        return Err("no PT_LOAD segment".into());
    }
    if !entry_inside {
        return Err(format!("entry {entry:#x} is outside every PT_LOAD segment"));
    }
    Ok(entry)
}

//! Guest kernels: `kernel.import`, `kernel.list`, `kernel.rm`, and the kernel an image boots.
//!
//! A kernel is an uncompressed vmlinux (ELF) copied into `kernels/<name>/vmlinux`. A file that is
//! not ELF is refused at import, not at boot; a kernel an image uses cannot be removed.

use super::requests::{KernelImport, NameRef};
use super::shared::{bad, check_name, create_dir, failed, not_found, Ctx};
use crate::error::Error;
use crate::rpc::RpcError;
use crate::store::{Image, Kernel};
use serde_json::{json, Value};
use std::path::Path;

/// `kernel.import`: checks the ELF magic, copies the file atomically, records the kernel.
pub fn import(ctx: &Ctx, req: KernelImport) -> Result<Value, RpcError> {
    let name = req.name.as_str();
    check_name("kernel", name)?;
    let src = Path::new(&req.path);
    if !src.is_absolute() || !src.is_file() {
        return Err(bad(format!(
            "kernel {} is not an absolute path to a file",
            src.display()
        )));
    }
    let mut magic = [0u8; 4];
    let is_elf = std::fs::File::open(src)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == *b"\x7fELF";
    if !is_elf {
        return Err(bad(format!(
            "{} is not an ELF kernel image (Firecracker on x86_64 boots an uncompressed vmlinux, not a bzImage)",
            src.display()
        )));
    }
    let dir = ctx.layout.kernels_dir().join(name);
    create_dir(&dir)?;
    let dst = dir.join("vmlinux");
    let tmp = dir.join(".vmlinux.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::fs::copy(src, &tmp)
        .and_then(|_| std::fs::rename(&tmp, &dst))
        .map_err(|e| {
            failed(Error::new(
                format!("copying {} to {}", src.display(), dst.display()),
                e,
            ))
        })?;
    let k = Kernel {
        name: name.to_string(),
        path: dst.to_string_lossy().into_owned(),
        created_at: crate::clock::now_rfc3339(),
    };
    ctx.db(|s| s.kernel_put(&k))?;
    Ok(serde_json::to_value(&k).unwrap_or(Value::Null))
}

/// `kernel.list`.
pub fn list(ctx: &Ctx) -> Result<Value, RpcError> {
    ctx.db(|s| s.kernel_list()).map(|v| json!({"kernels": v}))
}

/// `kernel.rm`: refused while an image uses the kernel.
pub fn remove(ctx: &Ctx, req: NameRef) -> Result<Value, RpcError> {
    let name = req.name.as_str();
    check_name("kernel", name)?;
    if !ctx.db(|s| s.kernel_delete(name))? {
        return Err(not_found(format!("no kernel named `{name}`")));
    }
    let _ = std::fs::remove_dir_all(ctx.layout.kernels_dir().join(name));
    Ok(json!({"removed": name}))
}

/// The kernel `image` boots.
pub fn for_image(ctx: &Ctx, image: &Image) -> Result<Kernel, RpcError> {
    let name = image
        .kernel
        .as_deref()
        .ok_or_else(|| bad(format!("image `{}` has no kernel", image.name)))?;
    ctx.db(|s| s.kernel_get(name))?
        .ok_or_else(|| not_found(format!("kernel `{name}` of image `{}` is gone", image.name)))
}

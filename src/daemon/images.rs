//! Images: `image.import`, `image.list`, `image.rm`, and which image a VM boots.
//!
//! An image is a root filesystem copied into `images/<name>/` plus the name of the kernel that
//! boots it. Removing an image never touches the VMs made from it (each has its own disk copy).

use super::ops::Operations;
use super::requests::{ImageImport, NameRef};
use super::shared::{bad, check_name, create_dir, failed, not_found, Ctx};
use crate::rpc::{ErrorCode, RpcError};
use crate::store::Image;
use serde_json::{json, Value};
use std::path::Path;

/// `image.import`: copies the root filesystem (copy-on-write where the filesystem can) and records
/// the image. Refused, with nothing copied, for an unknown kernel, a taken name or a bad path.
pub fn import(ctx: &Ctx, ops: &Operations, req: ImageImport) -> Result<Value, RpcError> {
    let name = req.name.as_str();
    check_name("image", name)?;
    let rootfs = Path::new(&req.rootfs);
    let kernel = req.kernel.as_str();
    let ready = req.ready_console.filter(|s| !s.is_empty());
    if ctx.db(|s| s.kernel_get(kernel))?.is_none() {
        return Err(not_found(format!(
            "no kernel named `{kernel}`: import it first with `banger kernel import {kernel} PATH`"
        )));
    }
    if ctx.db(|s| s.image_get(name))?.is_some() {
        return Err(RpcError::new(
            ErrorCode::AlreadyExists,
            format!("an image named `{name}` exists (remove it with `banger image rm {name}`)"),
        ));
    }
    if !rootfs.is_absolute() || !rootfs.is_file() {
        return Err(bad(format!(
            "rootfs {} is not an absolute path to a file",
            rootfs.display()
        )));
    }
    let op = ops.begin("image.import", Some(name));
    let dir = ctx.layout.images_dir().join(name);
    let r = (|| -> Result<Value, RpcError> {
        op.stage("copying root filesystem");
        let _ = std::fs::remove_dir_all(&dir);
        create_dir(&dir)?;
        let dst = dir.join("rootfs.ext4");
        crate::vmm::disk::cow_copy(rootfs, &dst).map_err(failed)?;
        let img = Image {
            name: name.to_string(),
            rootfs: dst.to_string_lossy().into_owned(),
            kernel: Some(kernel.to_string()),
            ready_pattern: ready,
            created_at: crate::clock::now_rfc3339(),
        };
        ctx.db(|s| s.image_put(&img))?;
        Ok(serde_json::to_value(&img).unwrap_or(Value::Null))
    })();
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    op.finish(r.as_ref().err().map(|e| e.message.clone()));
    r
}

/// `image.list`.
pub fn list(ctx: &Ctx) -> Result<Value, RpcError> {
    ctx.db(|s| s.image_list()).map(|v| json!({"images": v}))
}

/// `image.rm`: the row and the image's directory.
pub fn remove(ctx: &Ctx, req: NameRef) -> Result<Value, RpcError> {
    let name = req.name.as_str();
    check_name("image", name)?;
    if !ctx.db(|s| s.image_delete(name))? {
        return Err(not_found(format!("no image named `{name}`")));
    }
    let _ = std::fs::remove_dir_all(ctx.layout.images_dir().join(name));
    Ok(json!({"removed": name}))
}

/// The image named `name`, or the only image when `name` is `None`.
pub fn resolve(ctx: &Ctx, name: Option<&str>) -> Result<Image, RpcError> {
    match name {
        Some(n) => ctx.db(|s| s.image_get(n))?.ok_or_else(|| {
            not_found(format!(
                "no image named `{n}` (see `banger image list`; import one with `banger image import`)"
            ))
        }),
        None => {
            let mut all = ctx.db(|s| s.image_list())?;
            match all.len() {
                1 => Ok(all.remove(0)),
                0 => Err(not_found(
                    "no images yet: import one with `banger image import NAME --rootfs FILE --kernel KERNEL`",
                )),
                _ => Err(bad(
                    "several images exist: pick one with --image (see `banger image list`)",
                )),
            }
        }
    }
}

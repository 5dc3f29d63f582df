//! `banger image build`: builds a Debian guest image with [`crate::guest`] and imports it for the
//! owner through the daemon's `image.import`.
//!
//! Every refusal (not root, bad name or size, name taken, no such kernel, daemon down) happens
//! before any work, so a refused build creates nothing.

use crate::error::{Error, Result};
use crate::guest::build::{self, Request};
use crate::guest::customize::Inputs;
use crate::guest::debootstrap::Recipe;
use crate::guest::{ext4, mirror, progress::Progress};
use crate::layout::Layout;
use crate::rpc::client;
use argh::{ArgsInfo, FromArgs};
use serde_json::{json, Value};
use std::time::Duration;

/// The daemon copies the image into its state; a 2G sparse image takes seconds, a large one more.
const IMPORT_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(FromArgs, ArgsInfo)]
/// Build an image (as root): Debian with systemd, udev, sshd and the banger agent, made into ext4
/// and imported for the owner. The debootstrap result is cached, so rebuilds take seconds.
#[argh(
    subcommand,
    name = "build",
    example = "sudo banger image build dev",
    example = "sudo banger image build tools --package git --package build-essential --size 4G",
    note = "Needs debootstrap and e2fsprogs, and an imported kernel (build one with packaging/kernel/build.sh, then `banger kernel import`)."
)]
pub struct ImageBuildCmd {
    /// image name: 1-63 of a-z, 0-9, '-'
    #[argh(positional)]
    name: String,
    /// the Debian suite (default bookworm)
    #[argh(option, default = "String::from(\"bookworm\")")]
    suite: String,
    /// the Debian mirror URL (default: the one this host's apt uses for the suite, else
    /// http://deb.debian.org/debian)
    #[argh(option)]
    mirror: Option<String>,
    /// image size, e.g. 2G or 1536M (default 2G)
    #[argh(option, default = "String::from(\"2G\")")]
    size: String,
    /// an extra Debian package to install (repeat for more)
    #[argh(option)]
    package: Vec<String>,
    /// kernel to boot the image with (default: the only imported kernel)
    #[argh(option)]
    kernel: Option<String>,
}

/// Runs `image build`.
pub fn run(c: ImageBuildCmd) -> Result<i32> {
    super::require_root(
        "building an image",
        &format!("banger image build {}", c.name),
    )?;
    crate::helper::validate::vm_id(&c.name).map_err(|_| {
        Error::usage(
            format!("image name `{}`", c.name),
            "names are 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'",
        )
    })?;
    let size = ext4::parse_size(&c.size).map_err(|why| Error::usage("--size", why))?;
    let layout = Layout::from_env();
    let mirror = match &c.mirror {
        Some(m) => m.clone(),
        None => mirror::host_mirror(&layout.apt_dir(), &c.suite)
            .unwrap_or_else(|| mirror::FALLBACK.to_string()),
    };
    let recipe = Recipe::new(&c.suite, &mirror, &c.package)?;

    let sock = layout.daemon_socket();
    let images = client::call(&sock, "image.list", json!({}))
        .map_err(|e| e.into_error("asking the daemon for its images"))?;
    if name_taken(&images, &c.name) {
        return Err(Error::new(
            format!("building image `{}`", c.name),
            "an image with that name exists",
        )
        .hint(format!(
            "pick another name, or remove it first: banger image rm {}",
            c.name
        )));
    }
    let kernels = client::call(&sock, "kernel.list", json!({}))
        .map_err(|e| e.into_error("asking the daemon for its kernels"))?;
    let kernel = pick_kernel(&kernels, c.kernel.as_deref())?;
    let (uid, gid) = owner_ids(&layout)?;

    let p = Progress::for_stderr();
    let req = Request {
        name: c.name.clone(),
        recipe,
        size,
    };
    let built = build::build(&layout, &req, &Inputs::default(), &p)?;

    // The daemon runs as the owner and copies the file: hand it over readable by the owner only.
    let img = &built.image;
    std::os::unix::fs::chown(img, Some(uid), Some(gid))
        .and_then(|_| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(img, std::fs::Permissions::from_mode(0o600))
        })
        .map_err(|e| Error::new(format!("handing {} to uid {uid}", img.display()), e))?;
    p.stage(&format!(
        "importing as image `{}` (kernel `{kernel}`)",
        c.name
    ));
    client::call_with_timeout(
        &sock,
        "image.import",
        json!({"name": c.name, "rootfs": img.to_string_lossy(), "kernel": kernel,
               "origin": origin(&req.recipe.suite, &req.recipe.mirror, &c.package,
                                &crate::clock::now_rfc3339())}),
        IMPORT_TIMEOUT,
    )
    .map_err(|e| e.into_error(&format!("importing image `{}`", c.name)))?;
    let summary =
        format!(
        "built image {}: {} ext4 ({} in {} files), kernel {kernel}, {} {}, debootstrap {}, {:.1}s",
        c.name,
        ext4::human(size),
        ext4::human(built.usage.bytes),
        built.usage.inodes,
        req.recipe.suite,
        req.recipe.mirror,
        if built.debootstrap_cached { "cached" } else { "fresh" },
        p.elapsed_s()
    );
    drop(built);
    println!("{summary}");
    Ok(0)
}

/// The longest origin the daemon's `image.import` accepts, in bytes.
const ORIGIN_MAX: usize = 512;

/// What `image list` shows for a built image:
/// `built: debian bookworm from <mirror>, +<extra packages>, <date>` (cut to [`ORIGIN_MAX`]).
fn origin(suite: &str, mirror: &str, extra: &[String], now_rfc3339: &str) -> String {
    let date = now_rfc3339.get(..10).unwrap_or(now_rfc3339);
    let mut o = format!("built: debian {suite} from {mirror}");
    if !extra.is_empty() {
        o.push_str(&format!(", +{}", extra.join(" +")));
    }
    o.push_str(&format!(", {date}"));
    if o.len() > ORIGIN_MAX {
        let mut cut = ORIGIN_MAX - 3;
        while !o.is_char_boundary(cut) {
            cut -= 1;
        }
        o.truncate(cut);
        o.push_str("...");
    }
    o.retain(|c| !c.is_control());
    o
}

fn name_taken(images: &Value, name: &str) -> bool {
    images["images"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|i| i["name"] == name)
}

/// `--kernel` if it exists, else the only kernel; a clear error otherwise.
fn pick_kernel(kernels: &Value, wanted: Option<&str>) -> Result<String> {
    let names: Vec<&str> = kernels["kernels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k["name"].as_str())
        .collect();
    match (wanted, names.as_slice()) {
        (Some(w), _) if names.contains(&w) => Ok(w.to_string()),
        (Some(w), _) => Err(Error::usage(
            format!("--kernel {w}"),
            format!("no kernel named `{w}`"),
        )
        .hint(if names.is_empty() {
            "import one first: banger kernel import NAME PATH".to_string()
        } else {
            format!("known kernels: {}", names.join(", "))
        })),
        (None, [one]) => Ok(one.to_string()),
        (None, []) => Err(Error::new("building an image", "no kernel is imported").hint(
            "build one with packaging/kernel/build.sh and import it: banger kernel import NAME PATH/vmlinux",
        )),
        (None, many) => Err(Error::usage(
            "building an image",
            format!("{} kernels are imported: say which with --kernel", many.len()),
        )
        .hint(format!("known kernels: {}", many.join(", ")))),
    }
}

/// The uid/gid the daemon runs as: install.toml's owner, else whoever owns the daemon socket.
fn owner_ids(layout: &Layout) -> Result<(u32, u32)> {
    if let Some(info) = crate::system::install_toml::load(layout)? {
        return Ok((info.owner_uid, info.owner_gid));
    }
    let sock = layout.daemon_socket();
    let m = std::fs::metadata(&sock).map_err(|e| {
        Error::new(
            format!("finding the daemon's user from {}", sock.display()),
            e,
        )
    })?;
    use std::os::unix::fs::MetadataExt;
    Ok((m.uid(), m.gid()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_choice() {
        let none = json!({"kernels": []});
        let one = json!({"kernels": [{"name": "k6"}]});
        let two = json!({"kernels": [{"name": "k6"}, {"name": "k7"}]});
        assert_eq!(pick_kernel(&one, None).unwrap(), "k6");
        assert_eq!(pick_kernel(&two, Some("k7")).unwrap(), "k7");
        let e = pick_kernel(&two, None).unwrap_err();
        assert!(
            e.to_string().contains("--kernel") && e.to_string().contains("k6, k7"),
            "{e}"
        );
        let e = pick_kernel(&none, None).unwrap_err();
        assert!(e.to_string().contains("packaging/kernel/build.sh"), "{e}");
        let e = pick_kernel(&one, Some("k9")).unwrap_err();
        assert!(
            e.to_string().contains("no kernel named `k9`") && e.to_string().contains("k6"),
            "{e}"
        );
    }

    #[test]
    fn origin_line() {
        let now = "2026-12-01T14:50:00Z";
        assert_eq!(
            origin("bookworm", "http://deb.debian.org/debian", &[], now),
            "built: debian bookworm from http://deb.debian.org/debian, 2026-12-01"
        );
        assert_eq!(
            origin(
                "bookworm",
                "http://m/debian",
                &["git".into(), "curl".into()],
                now
            ),
            "built: debian bookworm from http://m/debian, +git +curl, 2026-12-01"
        );
        let many: Vec<String> = (0..200).map(|i| format!("pkg{i}")).collect();
        let o = origin("bookworm", "http://m/debian", &many, now);
        assert_eq!(o.len(), ORIGIN_MAX);
        assert!(
            o.ends_with("...") && o.starts_with("built: debian bookworm"),
            "{o}"
        );
    }

    #[test]
    fn taken_names() {
        let v = json!({"images": [{"name": "dev", "kernel": "k6"}]});
        assert!(name_taken(&v, "dev"));
        assert!(!name_taken(&v, "dev2"));
        assert!(!name_taken(&json!({}), "dev"));
    }
}

//! `banger doctor`: read-only health checks of this host's banger install.

use crate::error::Result;
use crate::layout::Layout;
use crate::system::doctor::{self, Check, Level};
use argh::{ArgsInfo, FromArgs};

#[derive(FromArgs, ArgsInfo)]
/// Check this host's banger install (read-only; never changes anything). Exits 1 on any FAIL.
#[argh(subcommand, name = "doctor")]
pub struct DoctorCmd {
    /// print the checks as JSON
    #[argh(switch)]
    json: bool,
}

/// Runs `banger doctor`.
pub fn run(c: DoctorCmd) -> Result<i32> {
    let layout = Layout::from_env();
    let svc = crate::system::service::Systemctl;
    let checks = checks(&layout, &svc);
    if c.json {
        println!("{}", doctor::render_json(&checks));
    } else {
        print!(
            "{}",
            doctor::render_text(&checks, doctor::use_color(super::stdout_is_tty()))
        );
    }
    Ok(if doctor::any_fail(&checks) { 1 } else { 0 })
}

/// Every doctor check, including the state store row that needs the store module.
pub(crate) fn checks(
    layout: &Layout,
    svc: &dyn crate::system::service::ServiceManager,
) -> Vec<Check> {
    let opts = doctor::DoctorOptions {
        extra: vec![store_check(layout)],
        ..Default::default()
    };
    doctor::run(layout, svc, &opts)
}

fn store_check(layout: &Layout) -> Check {
    let db = layout.state_db();
    let (level, details) = match crate::store::check(&db) {
        Ok(c) => {
            let level = match c.exit_code() {
                0 | 1 => Level::Pass,
                _ => Level::Fail,
            };
            (level, vec![format!("{}: {}", db.display(), c.line())])
        }
        Err(e) => (Level::Fail, vec![e.to_string()]),
    };
    Check {
        level,
        name: "state store".into(),
        details,
    }
}

//! Service control: the [`ServiceManager`] seam, its `systemctl` implementation, and a fake.
//!
//! Install, uninstall, update and doctor reach systemd only through this trait, so their every
//! branch (including failures and rollbacks) is unit-tested with [`FakeServices`], while the smoke
//! suite runs the same code against real systemd through [`Systemctl`].

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};

/// What banger needs from a service manager. All methods take a unit name like `bangerd.service`.
pub trait ServiceManager {
    /// Reloads unit files (`systemctl daemon-reload`).
    fn daemon_reload(&self) -> Result<()>;
    /// Enables a unit at boot.
    fn enable(&self, unit: &str) -> Result<()>;
    /// Disables a unit at boot.
    fn disable(&self, unit: &str) -> Result<()>;
    /// Starts a unit; with `Type=notify` this returns once the service reported ready.
    fn start(&self, unit: &str) -> Result<()>;
    /// Stops a unit.
    fn stop(&self, unit: &str) -> Result<()>;
    /// Restarts a unit; with `Type=notify` this returns once the service reported ready.
    fn restart(&self, unit: &str) -> Result<()>;
    /// True when the unit is active.
    fn is_active(&self, unit: &str) -> Result<bool>;
    /// True when the unit is enabled.
    fn is_enabled(&self, unit: &str) -> Result<bool>;
}

/// True when the host runs systemd as init (`/run/systemd/system` exists, as `sd_booted(3)` checks).
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// The real service manager: runs `systemctl`.
#[derive(Debug, Clone, Default)]
pub struct Systemctl;

impl Systemctl {
    /// Runs `systemctl ARGS…`, returning its exit status success and stderr.
    fn run(&self, args: &[&str]) -> Result<(bool, String)> {
        let shown = format!("systemctl {}", args.join(" "));
        let out = Command::new("systemctl")
            .args(args)
            .env("SYSTEMD_PAGER", "")
            .output()
            .map_err(|e| {
                Error::new(format!("running {shown}"), e)
                    .hint("is systemd installed and is systemctl on PATH?")
            })?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }

    /// Runs an action that must succeed; failures carry systemctl's stderr and a journalctl hint.
    fn action(&self, verb: &str, unit: Option<&str>) -> Result<()> {
        let mut args = vec![verb];
        args.extend(unit);
        let (ok, stderr) = self.run(&args)?;
        if ok {
            return Ok(());
        }
        // One line: systemctl's stderr often spans two ("Job for … failed …" / "See …"), and
        // banger's errors are one `banger: what: why (hint)` line.
        let stderr = stderr.split_whitespace().collect::<Vec<_>>().join(" ");
        let why = if stderr.is_empty() {
            "systemctl failed without a message".to_string()
        } else {
            stderr
        };
        let hint = match unit {
            Some(u) => format!("see journalctl -u {u} and systemctl status {u}"),
            None => "see journalctl -b _PID=1".to_string(),
        };
        Err(Error::new(format!("systemctl {}", args.join(" ")), why).hint(hint))
    }
}

impl ServiceManager for Systemctl {
    fn daemon_reload(&self) -> Result<()> {
        self.action("daemon-reload", None)
    }
    fn enable(&self, unit: &str) -> Result<()> {
        self.action("enable", Some(unit))
    }
    fn disable(&self, unit: &str) -> Result<()> {
        self.action("disable", Some(unit))
    }
    fn start(&self, unit: &str) -> Result<()> {
        self.action("start", Some(unit))
    }
    fn stop(&self, unit: &str) -> Result<()> {
        self.action("stop", Some(unit))
    }
    fn restart(&self, unit: &str) -> Result<()> {
        self.action("restart", Some(unit))
    }
    fn is_active(&self, unit: &str) -> Result<bool> {
        // Non-zero means inactive, failed or unknown: all "not active" for banger.
        Ok(self.run(&["is-active", "--quiet", unit])?.0)
    }
    fn is_enabled(&self, unit: &str) -> Result<bool> {
        Ok(self.run(&["is-enabled", "--quiet", unit])?.0)
    }
}

/// A scripted service manager for unit tests (here and in other modules).
///
/// Records every call as `"<verb> <unit>"` (`"daemon-reload"`, `"is-active bangerd.service"`…),
/// keeps an active/enabled set that the actions update, and fails calls on request: [`fail_on`]
/// fails every matching call, [`fail_once`] only the next one. A pattern is either a whole call
/// (`"restart bangerd.service"`) or a verb alone (`"restart"`). A failed call changes no state.
///
/// [`fail_on`]: FakeServices::fail_on
/// [`fail_once`]: FakeServices::fail_once
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct FakeServices {
    calls: Mutex<Vec<String>>,
    active: Mutex<BTreeSet<String>>,
    enabled: Mutex<BTreeSet<String>>,
    fail_always: Mutex<Vec<String>>,
    fail_next: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeServices {
    /// A fake with nothing active or enabled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fails every call matching `pattern` from now on.
    pub fn fail_on(&self, pattern: &str) {
        lock(&self.fail_always).push(pattern.to_string());
    }

    /// Fails the next call matching `pattern`, once.
    pub fn fail_once(&self, pattern: &str) {
        lock(&self.fail_next).push(pattern.to_string());
    }

    /// Forgets all configured failures.
    pub fn clear_failures(&self) {
        lock(&self.fail_always).clear();
        lock(&self.fail_next).clear();
    }

    /// Marks a unit active or inactive without recording a call.
    pub fn set_active(&self, unit: &str, active: bool) {
        let mut a = lock(&self.active);
        if active {
            a.insert(unit.to_string());
        } else {
            a.remove(unit);
        }
    }

    /// Marks a unit enabled or disabled without recording a call.
    pub fn set_enabled(&self, unit: &str, enabled: bool) {
        let mut e = lock(&self.enabled);
        if enabled {
            e.insert(unit.to_string());
        } else {
            e.remove(unit);
        }
    }

    /// Every call so far, queries included.
    pub fn calls(&self) -> Vec<String> {
        lock(&self.calls).clone()
    }

    /// Calls so far that change something (no `is-active`/`is-enabled`).
    pub fn actions(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| !c.starts_with("is-"))
            .collect()
    }

    /// Forgets the recorded calls (state and failures stay).
    pub fn clear_calls(&self) {
        lock(&self.calls).clear();
    }

    /// True when the unit is currently active in the fake.
    pub fn active(&self, unit: &str) -> bool {
        lock(&self.active).contains(unit)
    }

    /// True when the unit is currently enabled in the fake.
    pub fn enabled(&self, unit: &str) -> bool {
        lock(&self.enabled).contains(unit)
    }

    fn call(&self, verb: &str, unit: Option<&str>) -> Result<()> {
        let call = match unit {
            Some(u) => format!("{verb} {u}"),
            None => verb.to_string(),
        };
        lock(&self.calls).push(call.clone());
        let matches = |p: &String| *p == call || *p == verb;
        let mut next = lock(&self.fail_next);
        let once = next.iter().position(matches).map(|i| next.remove(i));
        drop(next);
        if once.is_some() || lock(&self.fail_always).iter().any(matches) {
            let hint = format!("see journalctl -u {}", unit.unwrap_or("init.scope"));
            return Err(Error::new(format!("systemctl {call}"), "injected failure").hint(hint));
        }
        Ok(())
    }
}

impl ServiceManager for FakeServices {
    fn daemon_reload(&self) -> Result<()> {
        self.call("daemon-reload", None)
    }
    fn enable(&self, unit: &str) -> Result<()> {
        self.call("enable", Some(unit))?;
        self.set_enabled(unit, true);
        Ok(())
    }
    fn disable(&self, unit: &str) -> Result<()> {
        self.call("disable", Some(unit))?;
        self.set_enabled(unit, false);
        Ok(())
    }
    fn start(&self, unit: &str) -> Result<()> {
        self.call("start", Some(unit))?;
        self.set_active(unit, true);
        Ok(())
    }
    fn stop(&self, unit: &str) -> Result<()> {
        self.call("stop", Some(unit))?;
        self.set_active(unit, false);
        Ok(())
    }
    fn restart(&self, unit: &str) -> Result<()> {
        self.call("restart", Some(unit))?;
        self.set_active(unit, true);
        Ok(())
    }
    fn is_active(&self, unit: &str) -> Result<bool> {
        self.call("is-active", Some(unit))?;
        Ok(self.active(unit))
    }
    fn is_enabled(&self, unit: &str) -> Result<bool> {
        self.call("is-enabled", Some(unit))?;
        Ok(self.enabled(unit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_records_and_tracks_state() {
        let f = FakeServices::new();
        f.enable("a.service").unwrap();
        f.start("a.service").unwrap();
        assert!(f.is_active("a.service").unwrap());
        assert!(f.is_enabled("a.service").unwrap());
        f.stop("a.service").unwrap();
        assert!(!f.is_active("a.service").unwrap());
        f.daemon_reload().unwrap();
        assert_eq!(
            f.actions(),
            [
                "enable a.service",
                "start a.service",
                "stop a.service",
                "daemon-reload"
            ]
        );
        assert_eq!(f.calls().len(), 7);
    }

    #[test]
    fn fake_failures() {
        let f = FakeServices::new();
        f.fail_once("restart b.service");
        f.fail_on("stop");
        let e = f.restart("b.service").unwrap_err();
        assert!(e.to_string().contains("journalctl -u b.service"), "{e}");
        assert!(!f.active("b.service"), "failed call must not change state");
        f.restart("b.service").unwrap();
        assert!(f.active("b.service"));
        assert!(f.stop("b.service").is_err());
        assert!(f.stop("c.service").is_err());
        assert!(f.active("b.service"));
        f.clear_failures();
        f.stop("b.service").unwrap();
        assert!(!f.active("b.service"));
    }
}

//! The operations registry: long work (vm create/start, image import) as visible, staged records.
//!
//! Live state is in memory (cheap to list); an operation's start and its end are mirrored to the
//! store so a restarted daemon still lists what happened. A stage change is memory only: it is not
//! worth a write on a path such as a snapshot restore, whose every stage takes about a millisecond,
//! and an operation a daemon restart interrupted is reported as such either way. A daemon that
//! starts finds unfinished rows from a previous life and marks them done with an "interrupted"
//! error.
//!
//! Each stage's duration is kept on the live operation (`timings`, shown by
//! `daemon.operations.list`) and logged with the operation's end, so a slow `vm create` says where
//! its time went. The timings stay in memory and the log; the stored row keeps only the stage.

use crate::store::{Operation, StageTime, Store};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How many finished operations are kept in memory.
const KEEP_DONE: usize = 100;

/// The registry.
pub struct Operations {
    live: Mutex<Vec<Operation>>,
    store: Arc<Mutex<Store>>,
}

/// A running operation; finish it with [`OpHandle::finish`]. Dropping it unfinished records an error.
pub struct OpHandle<'a> {
    reg: &'a Operations,
    id: String,
    finished: bool,
    /// When the operation began and when its current stage began.
    clock: Mutex<(Instant, Instant)>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 100_000.0).round() / 100.0
}

impl Operations {
    /// A registry mirrored into `store`.
    pub fn new(store: Arc<Mutex<Store>>) -> Self {
        Operations {
            live: Mutex::new(Vec::new()),
            store,
        }
    }

    /// Starts an operation of `kind` on `target`.
    pub fn begin(&self, kind: &str, target: Option<&str>) -> OpHandle<'_> {
        let op = Operation {
            id: crate::rpc::proto::new_op_id(),
            kind: kind.to_string(),
            stage: "starting".into(),
            target: target.map(str::to_string),
            started_at: crate::clock::now_rfc3339(),
            finished_at: None,
            done: false,
            error: None,
            timings: Vec::new(),
        };
        let id = op.id.clone();
        self.mirror(&op);
        if let Ok(mut live) = self.live.lock() {
            live.push(op);
        }
        let now = Instant::now();
        OpHandle {
            reg: self,
            id,
            finished: false,
            clock: Mutex::new((now, now)),
        }
    }

    /// Every operation in memory, oldest first.
    pub fn list(&self) -> Vec<Operation> {
        self.live.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Operations not done yet.
    pub fn running(&self) -> Vec<Operation> {
        self.list().into_iter().filter(|o| !o.done).collect()
    }

    /// Changes the live operation `id` and, when `mirror`, writes it to the store.
    fn update(&self, id: &str, mirror: bool, f: impl FnOnce(&mut Operation)) {
        let snapshot = {
            let Ok(mut live) = self.live.lock() else {
                return;
            };
            let Some(op) = live.iter_mut().find(|o| o.id == id) else {
                return;
            };
            f(op);
            let snap = op.clone();
            let done = live.iter().filter(|o| o.done).count();
            if done > KEEP_DONE {
                if let Some(pos) = live.iter().position(|o| o.done) {
                    live.remove(pos);
                }
            }
            snap
        };
        if mirror {
            self.mirror(&snapshot);
        }
    }

    fn mirror(&self, op: &Operation) {
        if let Ok(store) = self.store.lock() {
            if let Err(e) = store.op_update(op) {
                crate::logging::error(
                    "bangerd",
                    "recording operation failed",
                    serde_json::json!({"op": op.id, "error": e.to_string()}),
                );
            }
        }
    }
}

impl OpHandle<'_> {
    /// The operation id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The time since the current stage began; the next stage begins now.
    fn lap(&self) -> Duration {
        let mut c = self.clock.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let d = now - c.1;
        c.1 = now;
        d
    }

    /// Moves to a new stage (the one before it is timed).
    pub fn stage(&self, stage: &str) {
        let d = self.lap();
        self.reg.update(&self.id, false, |o| {
            o.timings.push(StageTime {
                stage: std::mem::replace(&mut o.stage, stage.to_string()),
                ms: ms(d),
                concurrent: false,
            })
        });
    }

    /// Records work that ran beside the stages (on another thread) and took `took`.
    pub fn concurrent(&self, what: &str, took: Duration) {
        self.reg.update(&self.id, false, |o| {
            o.timings.push(StageTime {
                stage: what.to_string(),
                ms: ms(took),
                concurrent: true,
            })
        });
    }

    /// Records the steps a helper reply reports (`steps: [{step, ms}]`) as work beside the stages,
    /// each named `<who>: <step>`.
    pub fn helper_steps(&self, who: &str, reply: &serde_json::Value) {
        let Some(steps) = reply.get("steps").and_then(|s| s.as_array()) else {
            return;
        };
        for s in steps {
            if let (Some(step), Some(ms)) = (s["step"].as_str(), s["ms"].as_f64()) {
                self.concurrent(
                    &format!("{who}: {step}"),
                    Duration::from_secs_f64(ms / 1000.0),
                );
            }
        }
    }

    /// Marks it done, successfully or with an error, and logs it with its stages' timings.
    pub fn finish(mut self, error: Option<String>) {
        self.finished = true;
        let d = self.lap();
        let total = {
            let c = self.clock.lock().unwrap_or_else(|p| p.into_inner());
            c.1 - c.0
        };
        let mut logged = None;
        self.reg.update(&self.id, true, |o| {
            o.timings.push(StageTime {
                stage: o.stage.clone(),
                ms: ms(d),
                concurrent: false,
            });
            o.done = true;
            o.finished_at = Some(crate::clock::now_rfc3339());
            o.stage = if error.is_some() { "failed" } else { "done" }.into();
            o.error = error;
            logged = Some(serde_json::json!({
                "op": o.id, "kind": o.kind, "target": o.target, "ok": o.error.is_none(),
                "ms": ms(total), "timings": o.timings,
            }));
        });
        if let Some(fields) = logged {
            crate::logging::info("bangerd", "operation finished", fields);
        }
    }
}

impl Drop for OpHandle<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.reg.update(&self.id, true, |o| {
                o.done = true;
                o.finished_at = Some(crate::clock::now_rfc3339());
                o.error = Some("abandoned without a result".into());
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_timed_in_memory_and_only_start_and_end_are_stored() {
        let d = crate::system::testutil::TempDir::new();
        let store = Arc::new(Mutex::new(
            Store::open(&d.path().join("state.db")).expect("store"),
        ));
        let ops = Operations::new(store.clone());
        let stored = |id: &str| {
            let s = store.lock().expect("lock");
            s.op_list(10)
                .expect("list")
                .into_iter()
                .find(|o| o.id == id)
                .expect("stored")
        };
        let op = ops.begin("vm.create", Some("dev"));
        let id = op.id().to_string();
        assert_eq!(stored(&id).stage, "starting");
        op.stage("loading");
        std::thread::sleep(Duration::from_millis(5));
        op.stage("resuming");
        op.concurrent("tap", Duration::from_millis(3));
        let live = ops.running();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].stage, "resuming");
        let names: Vec<_> = live[0].timings.iter().map(|t| t.stage.as_str()).collect();
        assert_eq!(names, ["starting", "loading", "tap"]);
        assert!(live[0].timings[1].ms >= 5.0, "{:?}", live[0].timings);
        assert!(live[0].timings[2].concurrent && !live[0].timings[1].concurrent);
        // A stage change is memory only: the stored row still shows where it began.
        assert_eq!(stored(&id).stage, "starting");
        op.finish(None);
        let done = &ops.list()[0];
        assert!(done.done);
        assert_eq!(done.stage, "done");
        let names: Vec<_> = done.timings.iter().map(|t| t.stage.as_str()).collect();
        assert_eq!(names, ["starting", "loading", "tap", "resuming"]);
        let row = stored(&id);
        assert!(row.done && row.finished_at.is_some());
        assert_eq!(row.stage, "done");
        assert!(row.timings.is_empty(), "timings are not stored");
        // The wire form lists them; a row read back has none and omits the key.
        let v = serde_json::to_value(done).expect("json");
        assert_eq!(v["timings"][3]["stage"], "resuming");
        assert!(v["timings"][0].get("concurrent").is_none());
        assert_eq!(v["timings"][2]["concurrent"], true);
        assert!(serde_json::to_value(&row)
            .expect("json")
            .get("timings")
            .is_none());
    }

    #[test]
    fn helper_steps_become_concurrent_timings() {
        let d = crate::system::testutil::TempDir::new();
        let store = Arc::new(Mutex::new(
            Store::open(&d.path().join("state.db")).expect("store"),
        ));
        let ops = Operations::new(store);
        let op = ops.begin("vm.create", None);
        op.helper_steps(
            "helper",
            &serde_json::json!({"steps": [{"step": "fork", "ms": 1.5}, {"step": 7}]}),
        );
        op.helper_steps("helper", &serde_json::json!({"no": "steps"}));
        let t = &ops.running()[0].timings;
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!(
            (t[0].stage.as_str(), t[0].ms, t[0].concurrent),
            ("helper: fork", 1.5, true)
        );
        op.finish(Some("boom".into()));
        assert_eq!(ops.list()[0].error.as_deref(), Some("boom"));
    }
}

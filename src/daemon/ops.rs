//! The operations registry: long work (vm create/start, image import) as visible, staged records.
//!
//! Live state is in memory (cheap to list); every change is mirrored to the store so a restarted
//! daemon still lists what happened. A daemon that starts finds unfinished rows from a previous
//! life and marks them done with an "interrupted" error.
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

    fn update(&self, id: &str, f: impl FnOnce(&mut Operation)) {
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
        self.mirror(&snapshot);
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
        self.reg.update(&self.id, |o| {
            o.timings.push(StageTime {
                stage: std::mem::replace(&mut o.stage, stage.to_string()),
                ms: ms(d),
                concurrent: false,
            })
        });
    }

    /// Records work that ran beside the stages (on another thread) and took `took`.
    pub fn concurrent(&self, what: &str, took: Duration) {
        self.reg.update(&self.id, |o| {
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
        self.reg.update(&self.id, |o| {
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
            self.reg.update(&self.id, |o| {
                o.done = true;
                o.finished_at = Some(crate::clock::now_rfc3339());
                o.error = Some("abandoned without a result".into());
            });
        }
    }
}

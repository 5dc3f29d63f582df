//! The operations registry: long work (vm create/start, image import) as visible, staged records.
//!
//! Live state is in memory (cheap to list); every change is mirrored to the store so a restarted
//! daemon still lists what happened. A daemon that starts finds unfinished rows from a previous
//! life and marks them done with an "interrupted" error.

use crate::store::{Operation, Store};
use std::sync::{Arc, Mutex};

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
        };
        let id = op.id.clone();
        self.mirror(&op);
        if let Ok(mut live) = self.live.lock() {
            live.push(op);
        }
        OpHandle {
            reg: self,
            id,
            finished: false,
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

    /// Moves to a new stage.
    pub fn stage(&self, stage: &str) {
        self.reg.update(&self.id, |o| o.stage = stage.to_string());
    }

    /// Marks it done, successfully or with an error.
    pub fn finish(mut self, error: Option<String>) {
        self.finished = true;
        self.reg.update(&self.id, |o| {
            o.done = true;
            o.finished_at = Some(crate::clock::now_rfc3339());
            o.stage = if error.is_some() { "failed" } else { "done" }.into();
            o.error = error;
        });
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

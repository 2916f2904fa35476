//! Erasures in progress and done, by receipt id, so one that outlasts its HTTP request
//! can be polled. Kept in memory (the last thousand): a receipt lost to a restart means
//! repeating the erasure, which is safe.

use std::collections::VecDeque;
use std::sync::Mutex;

use marsad_admin::erasure::{ErasureError, ErasureReceipt};
use serde_json::{Value, json};

/// Receipts kept.
const KEPT: usize = 1000;

/// The erasures of this query process.
#[derive(Debug, Default)]
pub(crate) struct ErasureReceipts {
    receipts: Mutex<VecDeque<(String, Value)>>,
}

impl ErasureReceipts {
    /// A new receipt id, its erasure waiting.
    pub(crate) fn start(&self) -> String {
        let id = format!("er-{:016x}", rand::random::<u64>());
        self.set(&id, json!({"receipt_id": id, "status": "waiting"}));
        id
    }

    /// Records how the erasure `id` ended.
    pub(crate) fn finish(&self, id: &str, outcome: &Result<ErasureReceipt, ErasureError>) {
        let status = match outcome {
            Ok(receipt) => {
                let mut r = serde_json::to_value(receipt).unwrap_or(Value::Null);
                r["receipt_id"] = json!(id);
                json!({"receipt_id": id, "status": "done", "receipt": r})
            }
            Err(e) => {
                json!({"receipt_id": id, "status": "failed", "error": format!("{e}; repeating the erasure is safe")})
            }
        };
        self.set(id, status);
    }

    /// Where erasure `id` stands.
    pub(crate) fn status(&self, id: &str) -> Option<Value> {
        let receipts = self.receipts.lock().ok()?;
        receipts.iter().find(|(i, _)| i == id).map(|(_, v)| v.clone())
    }

    fn set(&self, id: &str, status: Value) {
        let Ok(mut receipts) = self.receipts.lock() else { return };
        if let Some(entry) = receipts.iter_mut().find(|(i, _)| i == id) {
            entry.1 = status;
            return;
        }
        if receipts.len() >= KEPT {
            receipts.pop_front();
        }
        receipts.push_back((id.to_owned(), status));
    }
}

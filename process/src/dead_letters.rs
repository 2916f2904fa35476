//! Events the processor cannot store go to the dead-letter topic with the
//! reason, never silently away. The record keeps the raw payload (it is raw
//! log data, with the raw log's retention).

use marsad_eventlog::{EventLog, Position, Record};
use marsad_schemas::TOPIC_DEAD;
use serde_json::json;

/// One refused event.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Where it was in the raw log.
    pub position: Position,
    /// Why it was refused.
    pub reason: String,
    /// The raw payload, lossily decoded for reading.
    pub payload: Vec<u8>,
}

impl DeadLetter {
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "partition": self.position.partition,
            "offset": self.position.offset,
            "reason": self.reason,
            // when this copy of the raw payload was made: its retention counts from here
            "at": chrono::Utc::now(),
            "payload": String::from_utf8_lossy(&self.payload),
        }))
        .unwrap_or_default()
    }
}

/// Appends dead letters durably.
pub async fn send(log: &dyn EventLog, letters: &[DeadLetter]) -> marsad_eventlog::Result<()> {
    if letters.is_empty() {
        return Ok(());
    }
    let records = letters
        .iter()
        .map(|l| Record {
            key: None,
            payload: l.encode(),
        })
        .collect();
    log.append(TOPIC_DEAD, records).await.map(|_| ())
}

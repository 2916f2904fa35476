//! The exactly-once bookkeeping: which log position each Delta commit covers.
//! One Delta `txn` application id per topic-partition; its version is the
//! last offset written. A restarted processor reads it and resumes after it.

/// The Delta `txn` app id of a topic-partition in a table.
pub fn app_id(topic: &str, partition: u32) -> String {
    marsad_schemas::log_position_app_id(topic, partition)
}

/// Where to resume reading a partition, given the last committed offset.
pub fn resume_from(committed: Option<i64>) -> u64 {
    committed.map_or(0, |v| v.max(-1).saturating_add(1) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumes_after_the_committed_offset() {
        assert_eq!(resume_from(None), 0);
        assert_eq!(resume_from(Some(0)), 1);
        assert_eq!(resume_from(Some(41)), 42);
        assert_eq!(app_id("marsad.events.raw", 3), "marsad-marsad.events.raw-3");
    }
}

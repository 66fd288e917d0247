//! The history a run's row holds: the states it went through in the batch that created it
//! (see migration 0011), as a MessagePack array of arrays (seq, state, message, attempt,
//! timestamp, result, change id): about 40 bytes a state, encoded in well under a
//! microsecond. Its later states are rows of `states`.

use kiln_store::model::{Micros, StateRecord};
use kiln_store::state::StateType;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One entry: a [`StateRecord`] without its run id, and the id of the change that made it.
#[derive(Serialize, Deserialize)]
struct Entry<'a> {
    seq: u32,
    state: StateType,
    #[serde(borrow)]
    message: Option<std::borrow::Cow<'a, str>>,
    attempt: u32,
    timestamp: Micros,
    #[serde(borrow)]
    result: Option<std::borrow::Cow<'a, str>>,
    change: Option<Uuid>,
}

/// The entries of a run's history kept in its row, with the id of the change behind each
/// (nil for the state it was created in).
pub(crate) fn encode(entries: &[(StateRecord, Uuid)]) -> Vec<u8> {
    struct Entries<'a>(&'a [(StateRecord, Uuid)]);
    impl Serialize for Entries<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(self.0.iter().map(|(r, change)| Entry {
                seq: r.seq,
                state: r.state,
                message: r.message.as_deref().map(Into::into),
                attempt: r.attempt,
                timestamp: r.timestamp,
                result: r.result.as_deref().map(Into::into),
                change: (!change.is_nil()).then_some(*change),
            }))
        }
    }
    let mut out = Vec::with_capacity(48 * entries.len());
    rmp_serde::encode::write(&mut out, &Entries(entries)).expect("a history serializes");
    out
}

/// The entries of `run_id`'s history kept in its row.
pub(crate) fn decode(run_id: Uuid, bytes: &[u8]) -> Result<Vec<(StateRecord, Uuid)>, String> {
    let entries: Vec<Entry<'_>> = rmp_serde::from_slice(bytes)
        .map_err(|e| format!("the history kept in run {run_id}'s row is not valid: {e}"))?;
    Ok(entries
        .into_iter()
        .map(|e| {
            (
                StateRecord {
                    run_id,
                    seq: e.seq,
                    state: e.state,
                    message: e.message.map(Into::into),
                    attempt: e.attempt,
                    timestamp: e.timestamp,
                    result: e.result.map(Into::into),
                },
                e.change.unwrap_or_default(),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_reads_back_as_written() {
        let run = Uuid::now_v7();
        let change = Uuid::now_v7();
        let mut done = StateRecord::created(run, StateType::Completed, 7);
        done.seq = 2;
        done.attempt = 1;
        done.message = Some("a \"quoted\" line\nand another".into());
        done.result = Some(r#"{"storage":"local","key":"k"}"#.into());
        let written = vec![
            (StateRecord::created(run, StateType::Pending, 5), Uuid::nil()),
            (done, change),
        ];
        let read = decode(run, &encode(&written)).unwrap();
        assert_eq!(read.len(), 2);
        for ((a, ca), (b, cb)) in written.iter().zip(&read) {
            assert_eq!(
                (a.seq, a.state, a.attempt, a.timestamp),
                (b.seq, b.state, b.attempt, b.timestamp)
            );
            assert_eq!((&a.message, &a.result, ca), (&b.message, &b.result, cb));
        }
        let bytes = encode(&written);
        assert!(bytes.len() < 150, "{} bytes", bytes.len());
        assert!(
            decode(run, &bytes[..bytes.len() - 3])
                .unwrap_err()
                .contains(&run.to_string())
        );
    }
}

//! Resuming after a stop or a crash: which report to deliver first, and which content the
//! relay already has (or is about to get), so that a startup scan of that content is no news.

use std::sync::Arc;

use guestwatch_protocol::{
    ContentHash, DEFAULT_MAX_REPORT_PAYLOAD, Report, ReportBody, inventory::Document,
};

use super::{
    state::{Acked, Rejected, StateDir},
    stored,
    wire::Base,
};

/// What the previous run left behind.
#[derive(Debug, Default)]
pub struct Resumed {
    /// The report the previous run did not get acknowledged: delivered before anything else.
    pub pending: Option<Report>,
    /// The document it carries (a compact full report's).
    pub pending_document: Option<Arc<Document>>,
    /// The content of that report, or else of the last acknowledged one.
    pub baseline: Option<ContentHash>,
    /// The pending report's refusal by the relay, if it was refused for good.
    pub rejected: Option<Rejected>,
    /// The last acknowledged report and its document: the base of the next delta.
    pub base: Option<Base>,
}

impl Resumed {
    /// The newest report's document (pending, else acknowledged): what the next report's
    /// changes are counted from.
    pub fn previous(&self) -> Option<Arc<Document>> {
        self.pending_document
            .clone()
            .or_else(|| self.base.as_ref().map(|b| b.document.clone()))
    }
}

/// The document a stored full report carries, if it is a compact one that decodes.
fn document_of(report: &Report) -> Option<Arc<Document>> {
    let ReportBody::Full(payload) = &report.body else {
        return None;
    };
    let bytes = payload.to_document(DEFAULT_MAX_REPORT_PAYLOAD).ok()?;
    Document::from_bytes(&bytes).ok().map(Arc::new)
}

/// The stored base, if it is the acknowledged report of this epoch and still checks out.
fn base_of(state: &StateDir, acked: Option<&Acked>) -> Option<Base> {
    let acked = acked?;
    let bytes = state.load_base().ok()??;
    let report = stored::decode(&bytes)?;
    let fits = report.id.epoch == state.epoch()
        && report.id.generation == acked.generation
        && report.content_hash.to_hex() == acked.content_hash;
    if !fits {
        return None;
    }
    let document = document_of(&report)?;
    (document.content_hash() == report.content_hash).then_some(Base {
        id: report.id,
        content_hash: report.content_hash,
        document,
    })
}

/// Reads the pending report and the last acknowledgement. A pending report that cannot be
/// used (damaged, of another epoch, or acknowledged just before the stop) is removed.
pub fn resume(state: &StateDir) -> Resumed {
    let acked = state.load_acked().unwrap_or_else(|e| {
        log::warn!("reading the last acknowledgement: {e}");
        None
    });
    let acked_hash = acked
        .as_ref()
        .and_then(|a| ContentHash::from_hex(&a.content_hash));
    let stored = state.load_pending().unwrap_or_else(|e| {
        log::warn!("reading the pending report: {e}");
        None
    });
    let base = base_of(state, acked.as_ref());
    let Some(bytes) = stored else {
        return Resumed {
            baseline: acked_hash,
            base,
            ..Resumed::default()
        };
    };
    let usable = match stored::decode(&bytes) {
        None => Err("it is damaged".to_owned()),
        Some(report) if report.id.epoch != state.epoch() => {
            Err(format!("report {} belongs to another epoch", report.id))
        }
        // The acknowledgement was recorded, the crash came before the report was cleared.
        Some(report)
            if acked
                .as_ref()
                .is_some_and(|a| a.generation >= report.id.generation) =>
        {
            Err(format!("report {} was acknowledged already", report.id))
        }
        Some(report) => Ok(report),
    };
    match usable {
        Ok(report) => {
            log::info!(
                "resending report {} left unacknowledged by the previous run",
                report.id
            );
            let rejected = state
                .load_rejected()
                .ok()
                .flatten()
                .filter(|r| r.generation == report.id.generation);
            Resumed {
                baseline: Some(report.content_hash),
                pending_document: document_of(&report),
                pending: Some(report),
                rejected,
                base,
            }
        }
        Err(why) => {
            log::info!("not resending the stored pending report: {why}");
            if let Err(e) = state.clear_pending() {
                log::warn!("removing the stored pending report: {e}");
            }
            Resumed {
                baseline: acked_hash,
                base,
                ..Resumed::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use guestwatch_protocol::{Payload, ReportBody, ReportFacts, ReportId};

    use super::*;
    use crate::deliver::{machine::MachineId, state::Acked};

    fn report(epoch: u64, generation: u64, hash: u8) -> Report {
        Report {
            id: ReportId { epoch, generation },
            content_hash: ContentHash([hash; 32]),
            facts: ReportFacts::default(),
            body: ReportBody::Full(Payload::json(b"{}".to_vec())),
        }
    }

    fn open(dir: &std::path::Path) -> StateDir {
        StateDir::open(dir, &MachineId::Known("cd".repeat(32))).unwrap()
    }

    #[test]
    fn the_pending_report_is_resent_and_is_the_baseline() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = open(dir.path());
        let epoch = state.epoch();
        state.next_generation().unwrap();
        state
            .record_ack(
                &Acked {
                    generation: 1,
                    content_hash: hex::encode([1u8; 32]),
                },
                || None,
            )
            .unwrap();
        state.next_generation().unwrap();
        state
            .save_pending(&stored::encode(&report(epoch, 2, 2)).unwrap())
            .unwrap();
        let resumed = resume(&state);
        assert_eq!(resumed.pending.unwrap().id.generation, 2);
        assert_eq!(resumed.baseline, Some(ContentHash([2; 32])));
        assert!(resumed.rejected.is_none());
    }

    #[test]
    fn without_a_pending_report_the_acknowledged_content_is_the_baseline() {
        let dir = tempfile::tempdir().unwrap();
        let state = open(dir.path());
        assert!(resume(&state).baseline.is_none());
        state
            .save_acked(&Acked {
                generation: 4,
                content_hash: hex::encode([4u8; 32]),
            })
            .unwrap();
        let resumed = resume(&state);
        assert!(resumed.pending.is_none());
        assert_eq!(resumed.baseline, Some(ContentHash([4; 32])));
    }

    #[test]
    fn unusable_pending_reports_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = open(dir.path());
        let epoch = state.epoch();
        let acked = Acked {
            generation: 3,
            content_hash: hex::encode([3u8; 32]),
        };
        state.save_acked(&acked).unwrap();
        for bytes in [
            b"garbage".to_vec(),
            stored::encode(&report(epoch ^ 1, 9, 9)).unwrap(),
            // Acknowledged, but the crash came before it was cleared.
            stored::encode(&report(epoch, 3, 3)).unwrap(),
        ] {
            state.save_pending(&bytes).unwrap();
            let resumed = resume(&state);
            assert!(resumed.pending.is_none());
            assert_eq!(resumed.baseline, Some(ContentHash([3; 32])));
            assert_eq!(state.load_pending().unwrap(), None);
        }
        // A refusal is carried only for the report it was about.
        for _ in 0..4 {
            state.next_generation().unwrap();
        }
        state
            .save_pending(&stored::encode(&report(epoch, 4, 4)).unwrap())
            .unwrap();
        let refusal = Rejected {
            generation: 4,
            reason: "too_large".into(),
            max_frame: 100,
            max_report_payload: 1000,
        };
        state.save_rejected(&refusal).unwrap();
        assert_eq!(resume(&state).rejected, Some(refusal.clone()));
        state
            .save_rejected(&Rejected {
                generation: 2,
                ..refusal
            })
            .unwrap();
        assert_eq!(resume(&state).rejected, None);
    }
}

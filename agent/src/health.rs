//! What the agent's `/healthz` says: unhealthy, with the reason, while it has no working change
//! detector or cannot write its state directory. A missing relay is not the agent's ill
//! health (the report waits on disk and the relay has its own `/healthz`).

use std::sync::{Arc, Mutex};

use crate::{
    deliver::writer::StateWriter,
    detect::{DetectorChoice, DetectorMode, DetectorStatus},
};

/// The agent's health, shared by the tasks that can lose it.
#[derive(Clone)]
pub struct Health {
    detector: Arc<Mutex<Option<String>>>,
    state: StateWriter,
}

impl Health {
    /// Health as detection started (`choice` asked for, `status` obtained).
    pub fn new(choice: DetectorChoice, status: &DetectorStatus, state: StateWriter) -> Self {
        Self {
            detector: Arc::new(Mutex::new(detector_problem(choice, status))),
            state,
        }
    }

    /// Detection (or the scanning behind it) stopped for good.
    pub fn detection_lost(&self, why: impl Into<String>) {
        *self.detector.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.into());
    }

    pub fn check(&self) -> Result<(), String> {
        if let Some(why) = self
            .detector
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Err(why.clone());
        }
        self.state.health()
    }
}

/// Only the periodic scan running is a fault unless it is what the operator chose.
fn detector_problem(choice: DetectorChoice, status: &DetectorStatus) -> Option<String> {
    if status.mode != DetectorMode::Periodic || choice == DetectorChoice::Periodic {
        return None;
    }
    Some(format!(
        "no change detector: only the startup and periodic scans run (eBPF: {}; inotify: {})",
        status.bpf_unavailable.as_deref().unwrap_or("not used"),
        status.inotify_unavailable.as_deref().unwrap_or("not used"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        bpf::TamperStatus,
        deliver::{machine::MachineId, state::StateDir},
    };

    fn status(mode: DetectorMode) -> DetectorStatus {
        DetectorStatus {
            mode,
            bpf_unavailable: Some("no BTF".into()),
            tamper: TamperStatus::Off,
            inotify_unavailable: (mode == DetectorMode::Periodic).then(|| "ENOSPC".into()),
            libraries: Vec::new(),
            watching: "/var/lib/rpm".into(),
        }
    }

    #[test]
    fn says_why_it_is_unhealthy() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path(), &MachineId::Unknown("test".into())).unwrap();
        let writer = StateWriter::start(state).unwrap();
        let inotify = Health::new(
            DetectorChoice::Auto,
            &status(DetectorMode::Inotify),
            writer.clone(),
        );
        assert_eq!(inotify.check(), Ok(()));
        let chosen = Health::new(
            DetectorChoice::Periodic,
            &status(DetectorMode::Periodic),
            writer.clone(),
        );
        assert_eq!(chosen.check(), Ok(()));
        let fallen = Health::new(
            DetectorChoice::Auto,
            &status(DetectorMode::Periodic),
            writer.clone(),
        );
        let why = fallen.check().unwrap_err();
        assert!(
            why.contains("no change detector") && why.contains("ENOSPC"),
            "{why}"
        );
        inotify.detection_lost("detection stopped");
        assert_eq!(inotify.check(), Err("detection stopped".into()));
    }
}

//! The directory sink: `DIR/vms/<vm>/latest.json` (atomic, fsynced) and `DIR/deliveries.jsonl`
//! (one line per delivery, appended and fsynced before the guest is acknowledged).

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::SystemTime,
};

use tokio::sync::Mutex;

use super::{Delivery, DeliveryRecord, SinkError, envelope};

pub struct DirSink {
    root: PathBuf,
    /// Serialises appends to deliveries.jsonl and per-VM file replacement.
    lock: Mutex<()>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SinkError + '_ {
    move |source| SinkError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl DirSink {
    pub async fn open(root: PathBuf) -> Result<Self, SinkError> {
        let vms = root.join("vms");
        tokio::fs::create_dir_all(&vms).await.map_err(io(&vms))?;
        Ok(Self {
            root,
            lock: Mutex::new(()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub async fn deliver(&self, delivery: &Delivery) -> Result<(), SinkError> {
        let _guard = self.lock.lock().await;
        let root = self.root.clone();
        let delivery = delivery.clone();
        // Blocking file I/O with fsync: keep it off the async workers.
        tokio::task::spawn_blocking(move || write_delivery(&root, &delivery))
            .await
            .map_err(|e| SinkError::Io {
                path: self.root.clone(),
                source: std::io::Error::other(e),
            })?
    }

    /// The content hash recorded with the VM's latest report.
    pub async fn latest_hash(&self, vm: &str) -> Result<Option<String>, SinkError> {
        let path = self.root.join("vms").join(vm).join("latest.id");
        match tokio::fs::read_to_string(&path).await {
            Ok(text) => Ok(text.split_whitespace().nth(1).map(str::to_owned)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }
}

fn write_delivery(root: &Path, delivery: &Delivery) -> Result<(), SinkError> {
    let delivered_at = SystemTime::now();
    let vm_dir = root.join("vms").join(&delivery.vm);
    std::fs::create_dir_all(&vm_dir).map_err(io(&vm_dir))?;
    let latest = vm_dir.join("latest.json");
    let body = envelope(delivery, delivered_at).map_err(|e| SinkError::Io {
        path: latest.clone(),
        source: std::io::Error::other(e),
    })?;
    write_atomic(&latest, &body)?;
    // A small sidecar so duplicates are recognised without parsing latest.json.
    let id_path = vm_dir.join("latest.id");
    write_atomic(
        &id_path,
        format!("{} {}\n", delivery.report_id, delivery.content_hash).as_bytes(),
    )?;

    let mut line = serde_json::to_vec(&DeliveryRecord {
        delivery,
        delivered_at,
    })
    .map_err(|e| SinkError::Io {
        path: root.join("deliveries.jsonl"),
        source: std::io::Error::other(e),
    })?;
    line.push(b'\n');
    let log = root.join("deliveries.jsonl");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(io(&log))?;
    // One write per line: with O_APPEND the line lands whole.
    file.write_all(&line).map_err(io(&log))?;
    file.sync_data().map_err(io(&log))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SinkError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::tests::delivery;

    #[tokio::test]
    async fn writes_latest_and_appends_deliveries() {
        let dir = tempfile::tempdir().unwrap();
        let sink = DirSink::open(dir.path().to_path_buf()).await.unwrap();
        assert_eq!(sink.latest_hash("vm1").await.unwrap(), None);
        sink.deliver(&delivery("vm1", 1, "aa")).await.unwrap();
        sink.deliver(&delivery("vm1", 2, "bb")).await.unwrap();
        sink.deliver(&delivery("vm2", 1, "cc")).await.unwrap();

        let latest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("vms/vm1/latest.json")).unwrap())
                .unwrap();
        assert_eq!(latest["delivery"]["report_id"], "00000000000000aa-2");
        assert_eq!(latest["report"]["success"], true);
        assert_eq!(
            sink.latest_hash("vm1").await.unwrap().as_deref(),
            Some("bb")
        );
        assert_eq!(
            sink.latest_hash("vm2").await.unwrap().as_deref(),
            Some("cc")
        );

        let log = std::fs::read_to_string(dir.path().join("deliveries.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1]["vm"], "vm1");
        assert_eq!(lines[1]["content_hash"], "bb");
        assert!(lines[2]["delivered_at"].is_string());
        // No temporary files remain.
        assert!(!dir.path().join("vms/vm1/latest.tmp").exists());
    }
}

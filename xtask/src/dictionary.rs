//! `cargo xtask train-dict GO_RPMDB_TESTCASES`: trains the zstd dictionary compact documents are
//! compressed with (`protocol/dictionaries/`), from the installed-package lists of go-rpmdb's
//! test suite (`pkg/rpmdb_testcase_test.go` of knqyf263/go-rpmdb, MIT): CentOS 5–8, UBI 8,
//! Fedora 35 and Rocky Linux 9 as `rpm -qa` printed them.
//!
//! The lists of the databases `cargo xtask bench wire` measures (SUSE's and CBL-Mariner's)
//! are left out, so the bench measures the dictionary on distributions it has not seen.
//! Those lists write licences as Fedora and CentOS did before 2023 (`GPLv2+`); distributions
//! now write SPDX expressions (`GPL-2.0-or-later`: Fedora since 38, SUSE, Azure Linux), so half
//! of the training documents carry the same licences in SPDX form, by the mapping below.
//! Documents are trained on as the wire compresses them: without the raw header digests,
//! which go in a block of their own.
//!
//! Training is deterministic: the same file gives the same dictionary.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use guestwatch_protocol::{
    dictionary,
    inventory::{Document, PackageRecord, SystemFacts},
};

use crate::util::{note, step, workspace_root};

/// Lists whose distributions the wire bench measures: never trained on.
const HELD_OUT: [&str; 2] = ["SLE", "Mariner"];
/// Training documents: random subsets of the lists, as small and large systems are.
const SAMPLES: usize = 4000;

pub fn train(testcases: &Path) -> Result<()> {
    step(&format!(
        "reading package lists from {}",
        testcases.display()
    ));
    let text = std::fs::read_to_string(testcases)
        .with_context(|| format!("reading {}", testcases.display()))?;
    let lists = parse_lists(&text);
    ensure!(!lists.is_empty(), "no package lists found in the file");
    let mut training = Vec::new();
    for (name, records) in &lists {
        let held_out = HELD_OUT.iter().any(|h| name.contains(h));
        note(&format!(
            "{name}: {} packages{}",
            records.len(),
            if held_out { " (held out)" } else { "" }
        ));
        if !held_out && !records.is_empty() {
            training.push(records);
        }
    }
    if training.is_empty() {
        bail!("every list is held out: nothing to train on");
    }
    let mut rng = fastrand::Rng::with_seed(1);
    let backends = [
        ("sqlite", "usr/lib/sysimage/rpm", "rpmdb.sqlite"),
        ("sqlite", "var/lib/rpm", "rpmdb.sqlite"),
        ("bdb", "var/lib/rpm", "Packages"),
        ("ndb", "var/lib/rpm", "Packages.db"),
    ];
    let samples: Vec<Vec<u8>> = (0..SAMPLES)
        .map(|_| {
            let list = training[rng.usize(..training.len())];
            let mut records = list.clone();
            rng.shuffle(&mut records);
            records.truncate(rng.usize(1..=list.len()));
            // Install times as systems have them: most within minutes of the image build.
            let built = 1_500_000_000 + rng.u64(..300_000_000);
            let spdx = rng.bool();
            for r in &mut records {
                r.installtime = Some(built + rng.u64(..600));
                if spdx {
                    r.license = r.license.as_deref().map(spdx_expression);
                }
            }
            let (backend, dir, file) = backends[rng.usize(..backends.len())];
            let system = SystemFacts {
                package_db: format!("{backend}:{dir}"),
                backend: backend.into(),
                database: format!("/{dir}/{file}"),
                scan_duration_ms: Some(rng.u64(1..300)),
                ..SystemFacts::default()
            };
            Document::new(records, system).to_parts().0
        })
        .collect();
    step(&format!(
        "training a {} KiB dictionary on {SAMPLES} documents",
        dictionary::SIZE / 1024
    ));
    let mut dict = zstd::dict::from_samples(&samples, dictionary::SIZE)
        .context("zstd could not train a dictionary")?;
    dictionary::set_id(&mut dict, dictionary::ID).context("the trained dictionary")?;
    let out = workspace_root().join(dictionary::PATH);
    std::fs::write(&out, &dict).with_context(|| format!("writing {}", out.display()))?;
    note(&format!(
        "wrote {} ({} bytes, id {})",
        out.display(),
        dict.len(),
        dictionary::ID
    ));
    Ok(())
}

/// Fedora's legacy licence names and their SPDX identifiers (Fedora's published mapping; the
/// `with exceptions` forms as the gcc and glibc packages resolve them).
const SPDX: [(&str, &str); 27] = [
    (
        "LGPLv2+ with exceptions",
        "LGPL-2.1-or-later WITH GCC-exception-2.0",
    ),
    (
        "GPLv2+ with exceptions",
        "GPL-2.0-or-later WITH GCC-exception-2.0",
    ),
    (
        "GPLv3+ with exceptions",
        "GPL-3.0-or-later WITH GCC-exception-3.1",
    ),
    (
        "GPLv2 with exceptions",
        "GPL-2.0-only WITH Linux-syscall-note",
    ),
    ("BSD with advertising", "BSD-4-Clause"),
    ("Public Domain", "LicenseRef-Fedora-Public-Domain"),
    ("LGPLv2+", "LGPL-2.1-or-later"),
    ("GPLv2+", "GPL-2.0-or-later"),
    ("GPLv3+", "GPL-3.0-or-later"),
    ("LGPLv3+", "LGPL-3.0-or-later"),
    ("LGPLv2", "LGPL-2.0-only"),
    ("GPLv2", "GPL-2.0-only"),
    ("GPLv3", "GPL-3.0-only"),
    ("GPL+", "GPL-1.0-or-later"),
    ("MPLv2.0", "MPL-2.0"),
    ("MPLv1.1", "MPL-1.1"),
    ("ASL 2.0", "Apache-2.0"),
    ("GFDL", "GFDL-1.3-or-later"),
    ("Python", "Python-2.0"),
    ("AFL", "AFL-2.1"),
    ("Boost", "BSL-1.0"),
    ("zlib", "Zlib"),
    ("OpenLDAP", "OLDAP-2.8"),
    ("AGPLv3", "AGPL-3.0-only"),
    ("UCD", "Unicode-DFS-2016"),
    ("Artistic", "Artistic-1.0-Perl"),
    ("BSD", "BSD-3-Clause"),
];

/// A legacy licence string in SPDX form: each name mapped, `and`/`or` as `AND`/`OR`; a name
/// without a mapping is kept.
fn spdx_expression(legacy: &str) -> String {
    legacy
        .split(" and ")
        .map(|all| {
            all.split(" or ")
                .map(|name| {
                    let name = name.trim();
                    SPDX.iter()
                        .find(|(old, _)| *old == name)
                        .map_or(name, |(_, new)| new)
                })
                .collect::<Vec<_>>()
                .join(" OR ")
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The lists of the file: each `Name = func() []*PackageInfo {` followed by rows
/// `{intRef(E), "name", "version", "release", "arch", "srpm", size, "license", "vendor",
/// "modularitylabel", "summary", "sigmd5"},`.
fn parse_lists(text: &str) -> Vec<(String, Vec<PackageRecord>)> {
    let mut lists: Vec<(String, Vec<PackageRecord>)> = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_suffix(" = func() []*PackageInfo {") {
            lists.push((name.to_owned(), Vec::new()));
        } else if let (Some(record), Some((_, list))) = (parse_row(line), lists.last_mut()) {
            list.push(record);
        }
    }
    lists
}

fn parse_row(line: &str) -> Option<PackageRecord> {
    let rest = line.strip_prefix("{intRef(")?;
    let (epoch, rest) = rest.split_once(')')?;
    let mut fields = Vec::new();
    let mut chars = rest.chars();
    let mut bare = String::new();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let mut s = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => s.extend(chars.next()),
                        '"' => break,
                        c => s.push(c),
                    }
                }
                fields.push(s);
            }
            '0'..='9' => bare.push(c),
            ',' | '}' if !bare.is_empty() => fields.push(std::mem::take(&mut bare)),
            _ => {}
        }
    }
    let [
        name,
        version,
        release,
        arch,
        srpm,
        size,
        license,
        vendor,
        module,
        _summary,
        md5,
    ] = <[String; 11]>::try_from(fields).ok()?;
    let some = |s: String| (!s.is_empty() && s != "(none)").then_some(s);
    Some(PackageRecord {
        name,
        epoch: epoch.parse().ok(),
        version,
        release,
        arch: some(arch),
        sourcerpm: some(srpm),
        license: some(license),
        vendor: some(vendor),
        size: size.parse().ok(),
        modularitylabel: some(module),
        sigmd5: some(md5),
        ..PackageRecord::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_licences_get_their_spdx_form() {
        assert_eq!(
            spdx_expression("GPLv2+ and LGPLv2+ with exceptions or MIT"),
            "GPL-2.0-or-later AND LGPL-2.1-or-later WITH GCC-exception-2.0 OR MIT"
        );
        assert_eq!(spdx_expression("Vim"), "Vim", "no mapping: kept");
    }

    #[test]
    fn rows_and_lists_parse() {
        let text = r#"
	CentOS5Plain = func() []*PackageInfo {
		pkgs := []*commonPackageInfo{
			{intRef(), "setup", "2.5.58", "9.el5", "noarch", "setup-2.5.58-9.el5.src.rpm", 381527, "public domain", "CentOS", "", "A set of \"system\" files.", "9d46d21756374c2790de2d98d03ef456"},
			{intRef(1), "gmp", "6.2.0", "7.fc35", "x86_64", "gmp-6.2.0-7.fc35.src.rpm", 809478, "LGPLv3+ or GPLv2+", "Fedora Project", "", "GNU arbitrary precision library", "90e5db3d624adbdb7d59835ab68fb865"},
		}
	SLE15WithNDB = func() []*PackageInfo {
"#;
        let lists = parse_lists(text);
        assert_eq!(lists.len(), 2);
        let (name, records) = &lists[0];
        assert_eq!(name, "CentOS5Plain");
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].epoch, None);
        assert_eq!(records[0].size, Some(381_527));
        assert_eq!(records[0].license.as_deref(), Some("public domain"));
        assert_eq!(records[1].epoch, Some(1));
        assert_eq!(
            records[1].sigmd5.as_deref(),
            Some("90e5db3d624adbdb7d59835ab68fb865")
        );
        assert!(lists[1].1.is_empty());
    }
}

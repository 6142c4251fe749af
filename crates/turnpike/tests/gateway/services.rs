//! Real backing services for tests, started on free 127.0.0.1 ports from
//! their Debian packages. A missing package fails the test and names it;
//! `scripts/test` installs them.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{free_port, TempDir};

/// Finds `program` or fails the test naming the package to install.
fn require(program: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{program}` is not installed: `apt-get install {package}` (scripts/test does it)"
    );
}

/// Waits until something accepts TCP connections on `port`.
fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not listen on 127.0.0.1:{port}");
}

/// A `redis-server` of our own, without persistence.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        require("redis-server", "redis-server");
        let mut redis = Redis {
            port: free_port(),
            child: None,
            dir: TempDir::new(),
        };
        redis.resume();
        redis
    }

    /// Stops the server (as a crash would: SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty.
    pub fn resume(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir.path)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        wait_listening(self.port, "redis-server");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `dnsmasq` answering only the records given, with a 1 s TTL.
pub struct Dnsmasq {
    pub port: u16,
    child: Option<Child>,
}

impl Dnsmasq {
    /// `records` are dnsmasq options: `--host-record=…`, `--srv-host=…`.
    pub fn start(records: &[String]) -> Dnsmasq {
        require("dnsmasq", "dnsmasq-base");
        let port = loop {
            // dnsmasq answers on UDP and TCP: a port free for both.
            let p = free_port();
            if std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok() {
                break p;
            }
        };
        let mut d = Dnsmasq { port, child: None };
        d.restart(records);
        d
    }

    /// Starts again on the same port with other records.
    pub fn restart(&mut self, records: &[String]) {
        self.stop();
        let child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
            ])
            .args([
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--pid-file=",
                "--local-ttl=1",
            ])
            .arg(format!("--port={}", self.port))
            .args(records)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq starts");
        self.child = Some(child);
        wait_listening(self.port, "dnsmasq");
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An `etcd` of our own: one member, client and peer ports free, data in a
/// temporary directory that outlives a stop (so a restart keeps the data).
pub struct Etcd {
    pub port: u16,
    peer: u16,
    child: Option<Child>,
    dir: TempDir,
}

impl Etcd {
    pub fn start() -> Etcd {
        require("etcd", "etcd-server");
        require("etcdctl", "etcd-client");
        let mut etcd = Etcd {
            port: free_port(),
            peer: free_port(),
            child: None,
            dir: TempDir::new(),
        };
        etcd.resume();
        etcd
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops the server as a crash would (SIGKILL); the data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts (again) on the same ports and data.
    pub fn resume(&mut self) {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let log = std::fs::File::create(self.dir.path.join("etcd.log")).unwrap();
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(self.dir.path.join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("etcd starts");
        self.child = Some(child);
        wait_listening(self.port, "etcd");
    }

    /// Runs `etcdctl` against this server; panics with its output on failure.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .args(args)
            .output()
            .expect("etcdctl runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

//! A test rig of simulated BMCs: one `ipmi_sim` process (Debian package
//! `openipmi`) per BMC on 127.0.0.1, each with its own UDP port, user and
//! password, and a `chassis` script (`rig/chassis` in this crate) that keeps the
//! machine's power and boot device in a state file the tests read and
//! that injects faults on demand.
//!
//! Missing tools make the rig panic with what to install: tests never skip.
//! Every `ipmi_sim` is killed when its [`SimBmc`] is dropped, and also when
//! the test process dies: each runs under a small shell that kills it as
//! soon as its standard input (a pipe from the test process) closes.

use std::io::{BufRead, BufReader, Write};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use duffy_backend_ipmi::lanplus::packet::{Request, encode_v15};
use duffy_backend_ipmi::{BmcConfig, BmcInventory, Driver, Secret};

/// Every rig password starts with this, so tests can check that no
/// password shows in an error.
pub const PASSWORD_PREFIX: &str = "Sekr3t";

const EMU: &str = "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\nmc_enable 0x20\n";

const INSTALL_IPMI: &str = "apt-get update && apt-get install -y --no-install-recommends openipmi ipmitool";

/// The chassis control script.
pub fn chassis_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("rig/chassis")
}

/// Fails the test, saying what to install, unless `ipmi_sim` runs.
pub fn require_ipmi_sim() {
    crate::require("ipmi_sim", &["--version"], INSTALL_IPMI);
}

/// Fails the test, saying what to install, unless `ipmitool` runs.
pub fn require_ipmitool() {
    crate::require("ipmitool", &["-V"], INSTALL_IPMI);
}

/// A set of simulated BMCs, in a temporary directory.
pub struct Rig {
    /// The BMCs, in order.
    pub bmcs: Vec<SimBmc>,
    dir: tempfile::TempDir,
}

/// One simulated BMC.
pub struct SimBmc {
    /// Index in the rig.
    pub index: usize,
    /// UDP port on 127.0.0.1.
    pub port: u16,
    /// Its IPMI user.
    pub username: String,
    /// The user's password.
    pub password: String,
    /// The chassis state file (`power=0|1`, `boot=NAME`).
    pub state: PathBuf,
    dir: PathBuf,
    pid: u32,
    keeper: Option<Child>,
    keeper_stdin: Option<ChildStdin>,
}

impl Rig {
    /// Starts `n` simulated BMCs and waits until each answers.
    pub fn start(n: usize) -> Rig {
        require_ipmi_sim();
        assert!(chassis_script().exists(), "missing {}", chassis_script().display());
        let dir = tempfile::Builder::new().prefix("duffy-ipmi-rig-").tempdir().expect("temporary directory");
        let tag: u32 = rand::random::<u32>() % 100_000;
        let mut bmcs: Vec<SimBmc> = Vec::with_capacity(n);
        let ports = free_udp_ports(n);
        for (i, port) in ports.into_iter().enumerate() {
            let bdir = dir.path().join(format!("bmc{i}"));
            std::fs::create_dir_all(bdir.join("persist")).expect("BMC directory");
            let state = bdir.join("state");
            std::fs::write(&state, "power=0\nboot=none\n").expect("state file");
            let password = format!("{PASSWORD_PREFIX}{i}x{tag}");
            bmcs.push(SimBmc::spawn(i, port, format!("user{i}"), password, bdir, state));
        }
        // Wait for all of them together; restart any that lost its port to
        // another process in the meantime.
        for b in &mut bmcs {
            let mut tries = 0;
            while !b.wait_ready(Duration::from_secs(5)) {
                tries += 1;
                let log = std::fs::read_to_string(b.dir.join("sim.log")).unwrap_or_default();
                assert!(tries < 3, "ipmi_sim for BMC {} on port {} did not answer; its log:\n{log}", b.index, b.port);
                b.kill();
                b.port = free_udp_ports(1)[0];
                b.respawn();
            }
        }
        Rig { bmcs, dir }
    }

    /// The rig's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The `i`th BMC.
    pub fn bmc(&self, i: usize) -> &SimBmc {
        &self.bmcs[i]
    }

    /// The host name the tests give the node of BMC `i`.
    pub fn hostname(i: usize) -> String {
        format!("node{i}.rig.test")
    }

    /// An inventory with every BMC, for `driver`, with short test timings,
    /// adjusted by `tune`.
    pub fn inventory(&self, driver: Driver, tune: impl Fn(&mut BmcConfig)) -> BmcInventory {
        self.bmcs
            .iter()
            .map(|b| {
                let mut c = b.config(driver);
                tune(&mut c);
                (Rig::hostname(b.index), c)
            })
            .collect()
    }
}

impl SimBmc {
    fn spawn(index: usize, port: u16, username: String, password: String, dir: PathBuf, state: PathBuf) -> SimBmc {
        let mut b = SimBmc { index, port, username, password, state, dir, pid: 0, keeper: None, keeper_stdin: None };
        b.respawn();
        b
    }

    fn respawn(&mut self) {
        let conf = self.dir.join("bmc.conf");
        let emu = self.dir.join("bmc.emu");
        let text = format!(
            "name \"bmc{port}\"\n\
             set_working_mc 0x20\n\
             \x20 startlan 1\n\
             \x20   addr 127.0.0.1 {port}\n\
             \x20   priv_limit admin\n\
             \x20   allowed_auths_callback none md2 md5 straight\n\
             \x20   allowed_auths_user md2 md5 straight\n\
             \x20   allowed_auths_operator md2 md5 straight\n\
             \x20   allowed_auths_admin md2 md5 straight\n\
             \x20   guid a123456789abcdefa123456789ab{port:04x}\n\
             \x20 endlan\n\
             \x20 chassis_control \"{script} {state}\"\n\
             \x20 user 2 true \"{user}\" \"{pass}\" admin 10 md5\n",
            port = self.port,
            script = chassis_script().display(),
            state = self.state.display(),
            user = self.username,
            pass = self.password,
        );
        std::fs::write(&conf, text).expect("write BMC.conf");
        std::fs::write(&emu, EMU).expect("write bmc.emu");
        // The keeper shell starts ipmi_sim, prints its PID, and kills it when
        // its stdin closes (at drop, or when the test process dies).
        let script = r#"ipmi_sim -c "$1" -f "$2" -s "$3" -n </dev/null >"$4" 2>&1 &
echo $!
read _ignored
kill -KILL $! 2>/dev/null
wait
"#;
        let mut keeper = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(&conf)
            .arg(&emu)
            .arg(self.dir.join("persist"))
            .arg(self.dir.join("sim.log"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the ipmi_sim keeper shell");
        let mut line = String::new();
        let stdout = keeper.stdout.take().expect("keeper stdout");
        BufReader::new(stdout).read_line(&mut line).expect("read ipmi_sim pid");
        self.pid = line.trim().parse().expect("ipmi_sim pid");
        std::fs::write(self.state.with_extension("pid"), format!("{}\n", self.pid)).expect("pid file");
        self.keeper_stdin = keeper.stdin.take();
        self.keeper = Some(keeper);
    }

    /// Sends Get Channel Authentication Capabilities until an answer comes.
    fn wait_ready(&self, within: Duration) -> bool {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind probe socket");
        sock.set_read_timeout(Some(Duration::from_millis(100))).expect("probe timeout");
        let probe = encode_v15(&Request { netfn: 0x06, cmd: 0x38, rq_seq: 1, data: vec![0x8e, 0x04] }.encode());
        let until = Instant::now() + within;
        let mut buf = [0u8; 512];
        while Instant::now() < until {
            let _ = sock.send_to(&probe, ("127.0.0.1", self.port));
            if matches!(sock.recv_from(&mut buf), Ok((n, _)) if n > 4) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// A configuration of this BMC for `driver`, with test timings: 1 s per
    /// attempt, 1 retry, 10 s deadline.
    pub fn config(&self, driver: Driver) -> BmcConfig {
        let mut c = BmcConfig::new("127.0.0.1", self.username.clone(), Secret::new(self.password.clone()));
        c.port = self.port;
        c.driver = driver;
        c.timeout = Duration::from_secs(1);
        c.retries = 1;
        c.deadline = Duration::from_secs(10);
        c
    }

    fn read_state(&self, key: &str) -> String {
        let text = std::fs::read_to_string(&self.state).expect("read state file");
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .unwrap_or_else(|| panic!("no {key} in state file: {text}"))
            .to_string()
    }

    /// `"0"` or `"1"`, from the state file.
    pub fn power(&self) -> String {
        self.read_state("power")
    }

    /// The next boot device in the state file (`pxe`, `default` for disk,
    /// `none`).
    pub fn boot(&self) -> String {
        self.read_state("boot")
    }

    /// Sets the power in the state file, as if the machine changed by itself.
    pub fn set_power(&self, on: bool) {
        let boot = self.boot();
        let tmp = self.state.with_extension("w");
        std::fs::write(&tmp, format!("power={}\nboot={boot}\n", u8::from(on))).expect("write state");
        std::fs::rename(&tmp, &self.state).expect("replace state");
    }

    /// Every call the BMC made to the chassis script, in order.
    pub fn log(&self) -> Vec<String> {
        std::fs::read_to_string(self.state.with_extension("log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Forgets the calls made so far.
    pub fn clear_log(&self) {
        let _ = std::fs::remove_file(self.state.with_extension("log"));
    }

    fn flag(&self, ext: &str, content: Option<&str>) {
        let path = self.state.with_extension(ext);
        match content {
            Some(c) => {
                let mut f = std::fs::File::create(&path).expect("create flag file");
                f.write_all(c.as_bytes()).expect("write flag file");
            }
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Makes every chassis call fail (the BMC answers "Unspecified error").
    pub fn set_failing(&self, failing: bool) {
        self.flag("fail", failing.then_some("1"));
    }

    /// Makes every chassis call take `secs` seconds first (the whole BMC
    /// blocks meanwhile: ipmi_sim waits for the script).
    pub fn set_delay(&self, secs: Option<f64>) {
        let text = secs.map(|s| format!("{s}"));
        self.flag("delay", text.as_deref());
    }

    /// Makes the next chassis call freeze the BMC (SIGSTOP) mid-command.
    pub fn hang_on_next_call(&self) {
        self.flag("hang", Some("1"));
    }

    /// Sends a signal with the shell's `kill` builtin (no procps needed).
    fn send_signal(pid: u32, sig: &str) -> std::io::Result<std::process::ExitStatus> {
        Command::new("sh").arg("-c").arg("kill \"$1\" \"$2\"").arg("sh").arg(sig).arg(pid.to_string()).status()
    }

    fn signal(&self, sig: &str) {
        let ok = Self::send_signal(self.pid, sig).map(|s| s.success());
        assert!(matches!(ok, Ok(true)), "kill {sig} {} failed", self.pid);
    }

    /// Freezes the BMC (SIGSTOP): it receives but never answers.
    pub fn stop(&self) {
        self.signal("-STOP");
    }

    /// Thaws a frozen BMC (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn kill(&mut self) {
        if self.pid != 0 {
            let _ = Self::send_signal(self.pid, "-KILL");
        }
        // Closing stdin makes the keeper shell kill ipmi_sim too and exit.
        self.keeper_stdin.take();
        if let Some(mut k) = self.keeper.take() {
            let _ = k.wait();
        }
        self.pid = 0;
    }
}

impl Drop for SimBmc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `n` distinct UDP ports on 127.0.0.1 that were free a moment ago.
pub fn free_udp_ports(n: usize) -> Vec<u16> {
    let socks: Vec<UdpSocket> = (0..n).map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind a free port")).collect();
    socks.iter().map(|s| s.local_addr().expect("local address").port()).collect()
}

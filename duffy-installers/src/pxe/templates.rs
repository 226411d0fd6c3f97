//! What a machine being installed is served: the iPXE script and the
//! kickstart, rendered from the built-in templates or an operator's
//! directory of overrides, with the URLs of the install endpoints that
//! the HTTP service gives ([`InstallEndpoints`]).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use duffy_core::{Arch, PoolKey};

use super::config::{url_char_ok, validate_public_url, validate_url_pattern};
use super::{PxeConfig, PxeError, PxeImage};
use crate::keys::PublicKey;
use crate::template;
use crate::util::one_line;

/// The built-in iPXE template.
pub const DEFAULT_IPXE_TEMPLATE: &str = include_str!("../templates/ipxe.tmpl");

/// The built-in kickstart template (Anaconda, EL7 and later).
pub const DEFAULT_KICKSTART_TEMPLATE: &str = include_str!("../templates/ks.tmpl");

/// An iPXE script that boots the local disk: what the HTTP layer can serve
/// a machine that PXE-boots with no install pending.
pub const LOCAL_BOOT_SCRIPT: &str =
    "#!ipxe\n# Duffy: no install pending for this machine; boot from the local disk.\nexit\n";

/// Where Duffy's HTTP service serves the endpoints a machine being
/// installed calls. The HTTP service owns its routes and gives them here
/// (duffy-http: `api::install_endpoints`); this crate only renders them.
/// Each is a path under [`PxeConfig::public_url`] with the start of its
/// query, to which the install token is appended: for example
/// duffy-http's `/Install/kickstart?token=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallEndpoints {
    /// Where the installer fetches the node's kickstart
    /// (`kickstart_url`).
    pub kickstart: String,
    /// Where the installed machine reports success (`callback_done`; the
    /// templates append `&host_key=…`).
    pub done: String,
    /// Where the machine reports a failed install (`callback_failed`; the
    /// templates append `&reason=…`).
    pub failed: String,
}

/// Every placeholder the iPXE and kickstart templates may use:
///
/// - `hostname`, `ip` (empty when unknown), `hardware_arch`: the node;
/// - `release`, `arch`, `flavor` (empty when none): the image;
/// - `kernel_url`, `initrd_url`, `repo_url`: the image's boot files and
///   package repository (see [`PxeConfig`]);
/// - `kickstart_url`: `{public_url}` followed by
///   [`InstallEndpoints::kickstart`] and the token;
/// - `callback_done`: the same with [`InstallEndpoints::done`] (append
///   `&host_key=…`, e.g. with `curl -G --data-urlencode`);
/// - `callback_failed`: the same with [`InstallEndpoints::failed`] (append
///   `&reason=…`);
/// - `provisioning_key`: Duffy's SSH public key, one line;
/// - `token`: the install token; `public_url`: Duffy's base URL.
pub const PLACEHOLDERS: [&str; 15] = [
    "hostname",
    "ip",
    "hardware_arch",
    "release",
    "arch",
    "flavor",
    "kernel_url",
    "initrd_url",
    "repo_url",
    "kickstart_url",
    "callback_done",
    "callback_failed",
    "provisioning_key",
    "token",
    "public_url",
];

/// The largest template file accepted.
pub(super) const MAX_TEMPLATE: u64 = 1024 * 1024;

/// Which template: the iPXE script or the kickstart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Ipxe,
    Kickstart,
}

impl Kind {
    /// The file name prefix of its templates (`ipxe-9-x86_64.tmpl`).
    fn prefix(self) -> &'static str {
        match self {
            Kind::Ipxe => "ipxe",
            Kind::Kickstart => "ks",
        }
    }

    fn builtin(self) -> &'static str {
        match self {
            Kind::Ipxe => DEFAULT_IPXE_TEMPLATE,
            Kind::Kickstart => DEFAULT_KICKSTART_TEMPLATE,
        }
    }
}

/// One pending install as its templates see it.
pub(super) struct Install<'a> {
    pub(super) hostname: &'a str,
    pub(super) ip: IpAddr,
    pub(super) hardware_arch: Arch,
    pub(super) image: &'a PoolKey,
    pub(super) token: &'a str,
}

/// The values of a template's placeholders for one install.
pub(super) type Vars = Vec<(&'static str, String)>;

/// Everything rendering needs, checked once when the registry is built:
/// the base URL and endpoints, the provisioning key, the URL patterns and
/// the operator's templates.
pub(super) struct Templates {
    public_url: String,
    endpoints: InstallEndpoints,
    provisioning_key: String,
    kernel_url: String,
    initrd_url: String,
    repo_url: String,
    images: Vec<PxeImage>,
    /// Templates from `templates_dir`, by file name.
    files: BTreeMap<String, String>,
}

impl Templates {
    /// Checks `config`'s public URL, provisioning key and URL patterns and
    /// `endpoints`, and loads the templates of `templates_dir`.
    pub(super) fn new(config: &PxeConfig, endpoints: InstallEndpoints) -> Result<Self, PxeError> {
        let public_url = config.public_url.trim().trim_end_matches('/').to_string();
        validate_public_url(&public_url)?;
        let provisioning_key = PublicKey::parse(&config.provisioning_public_key)
            .map_err(|e| PxeError::Config(format!("provisioning_public_key: {e}")))?
            .to_string();
        if config.token_ttl.is_zero() {
            return Err(PxeError::Config("token_ttl must be more than zero".to_string()));
        }
        if config.poll_interval.is_zero() {
            return Err(PxeError::Config("poll_interval must be more than zero".to_string()));
        }
        let mut patterns = vec![
            ("kernel_url".to_string(), config.kernel_url.as_str()),
            ("initrd_url".to_string(), config.initrd_url.as_str()),
            ("repo_url".to_string(), config.repo_url.as_str()),
        ];
        for img in &config.images {
            duffy_core::model::validate_token("release", &img.release, 64)
                .map_err(|e| PxeError::Config(format!("images: {e}")))?;
            let at = |field: &str| format!("images[{}/{}].{field}", img.release, img.arch);
            patterns.extend(img.kernel_url.as_deref().map(|u| (at("kernel_url"), u)));
            patterns.extend(img.initrd_url.as_deref().map(|u| (at("initrd_url"), u)));
            patterns.extend(img.repo_url.as_deref().map(|u| (at("repo_url"), u)));
        }
        for (name, pattern) in patterns {
            validate_url_pattern(&name, pattern)?;
        }
        for (name, path) in
            [("kickstart", &endpoints.kickstart), ("done", &endpoints.done), ("failed", &endpoints.failed)]
        {
            validate_endpoint(name, path)?;
        }
        let files = match &config.templates_dir {
            Some(dir) => load_templates(dir)?,
            None => BTreeMap::new(),
        };
        Ok(Templates {
            public_url,
            endpoints,
            provisioning_key,
            kernel_url: config.kernel_url.clone(),
            initrd_url: config.initrd_url.clone(),
            repo_url: config.repo_url.clone(),
            images: config.images.clone(),
            files,
        })
    }

    /// Duffy's base URL as machines reach it, without a trailing `/`.
    pub(super) fn public_url(&self) -> &str {
        &self.public_url
    }

    /// The names of the operator's templates.
    pub(super) fn file_names(&self) -> Vec<&String> {
        self.files.keys().collect()
    }

    /// The template of `kind` for `image`: from `templates_dir` if there
    /// is one, else the built-in; with its name for logs and errors.
    fn template(&self, kind: Kind, image: &PoolKey) -> (String, &str) {
        let prefix = kind.prefix();
        for name in [format!("{prefix}-{}-{}.tmpl", image.release, image.arch), format!("{prefix}.tmpl")] {
            if let Some(t) = self.files.get(&name) {
                return (name, t.as_str());
            }
        }
        (format!("built-in {prefix}.tmpl"), kind.builtin())
    }

    fn image_urls(&self, image: &PoolKey) -> Result<ImageUrls, PxeError> {
        let own = self.images.iter().find(|i| i.release == image.release && i.arch == image.arch);
        let pick = |field: &str, own: Option<&String>, default: &str| -> Result<String, PxeError> {
            let pattern = own.map(String::as_str).unwrap_or(default);
            template::render(
                pattern,
                &[
                    ("release", image.release.as_str()),
                    ("arch", image.arch.as_str()),
                    ("flavor", image.flavor.as_deref().unwrap_or("")),
                ],
            )
            .map_err(|source| PxeError::Template { name: field.to_string(), source })
        };
        Ok(ImageUrls {
            kernel: pick("kernel_url", own.and_then(|i| i.kernel_url.as_ref()), &self.kernel_url)?,
            initrd: pick("initrd_url", own.and_then(|i| i.initrd_url.as_ref()), &self.initrd_url)?,
            repo: pick("repo_url", own.and_then(|i| i.repo_url.as_ref()), &self.repo_url)?,
        })
    }

    /// The placeholders' values for `install`.
    pub(super) fn vars(&self, install: &Install<'_>) -> Result<Vars, PxeError> {
        let urls = self.image_urls(install.image)?;
        let base = &self.public_url;
        let token = install.token;
        let ep = &self.endpoints;
        Ok(vec![
            ("hostname", install.hostname.to_string()),
            ("ip", install.ip.to_string()),
            ("hardware_arch", install.hardware_arch.as_str().to_string()),
            ("release", install.image.release.clone()),
            ("arch", install.image.arch.as_str().to_string()),
            ("flavor", install.image.flavor.clone().unwrap_or_default()),
            ("kernel_url", urls.kernel),
            ("initrd_url", urls.initrd),
            ("repo_url", urls.repo),
            ("kickstart_url", format!("{base}{}{token}", ep.kickstart)),
            ("callback_done", format!("{base}{}{token}", ep.done)),
            ("callback_failed", format!("{base}{}{token}", ep.failed)),
            ("provisioning_key", self.provisioning_key.clone()),
            ("token", token.to_string()),
            ("public_url", base.clone()),
        ])
    }

    /// Renders the template of `kind` for `image` with `vars`; returns the
    /// template's name (for the log) and the text.
    pub(super) fn render(&self, kind: Kind, image: &PoolKey, vars: &Vars) -> Result<(String, String), PxeError> {
        let (name, text) = self.template(kind, image);
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let rendered =
            template::render(text, &vars).map_err(|source| PxeError::Template { name: name.clone(), source })?;
        Ok((name, rendered))
    }
}

/// The URLs of one image.
struct ImageUrls {
    kernel: String,
    initrd: String,
    repo: String,
}

/// An endpoint the HTTP service gave goes verbatim into iPXE scripts and
/// single-quoted shell strings, like every URL: a path and the start of a
/// query, of the characters [`url_char_ok`] allows.
fn validate_endpoint(name: &str, path: &str) -> Result<(), PxeError> {
    if path.starts_with('/') && path.bytes().all(url_char_ok) {
        return Ok(());
    }
    Err(PxeError::Config(format!(
        "the {name} endpoint {:?} must be a path (/…) without spaces, quotes, '$', '\\' or '`'",
        one_line(path, 200)
    )))
}

fn load_templates(dir: &Path) -> Result<BTreeMap<String, String>, PxeError> {
    use std::io::Read;
    let io = |path: &Path, source| PxeError::Io { path: path.to_path_buf(), source };
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let entry = entry.map_err(|e| io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = (name.starts_with("ipxe") || name.starts_with("ks")) && name.ends_with(".tmpl");
        if !ours {
            tracing::debug!(file = %name, "ignoring a file in the PXE templates directory");
            continue;
        }
        let path = entry.path();
        let mut text = String::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_TEMPLATE + 1).read_to_string(&mut text))
            .map_err(|e| io(&path, e))?;
        if text.len() as u64 > MAX_TEMPLATE {
            return Err(PxeError::Config(format!("template {} is larger than {MAX_TEMPLATE} bytes", path.display())));
        }
        template::check(&text, &PLACEHOLDERS).map_err(|source| PxeError::Template { name: name.clone(), source })?;
        out.insert(name, text);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIByrgFoRodMpGoIGtVxnK/CTnXeEUb1KLNez/P0VJgK+ duffy@farm";

    fn endpoints(prefix: &str) -> InstallEndpoints {
        InstallEndpoints {
            kickstart: format!("{prefix}/ks?t="),
            done: format!("{prefix}/ok?t="),
            failed: format!("{prefix}/ko?t="),
        }
    }

    #[test]
    fn builtin_templates_use_known_placeholders() {
        template::check(DEFAULT_IPXE_TEMPLATE, &PLACEHOLDERS).unwrap();
        template::check(DEFAULT_KICKSTART_TEMPLATE, &PLACEHOLDERS).unwrap();
    }

    /// The URLs machines call back are the base URL and the endpoints the
    /// HTTP service gave, whatever they are.
    #[test]
    fn callback_urls_are_the_endpoints_given() {
        let config = PxeConfig::new("http://10.0.0.1:8081/", KEY);
        let t = Templates::new(&config, endpoints("/boot")).unwrap();
        let image = PoolKey::new("9", Arch::X86_64, None);
        let install = Install {
            hostname: "n1.example.org",
            ip: IpAddr::from([10, 0, 0, 11]),
            hardware_arch: Arch::X86_64,
            image: &image,
            token: "abc",
        };
        let vars = t.vars(&install).unwrap();
        let var = |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(var("kickstart_url"), Some("http://10.0.0.1:8081/boot/ks?t=abc"));
        assert_eq!(var("callback_done"), Some("http://10.0.0.1:8081/boot/ok?t=abc"));
        assert_eq!(var("callback_failed"), Some("http://10.0.0.1:8081/boot/ko?t=abc"));
        let (name, script) = t.render(Kind::Ipxe, &image, &vars).unwrap();
        assert_eq!(name, "built-in ipxe.tmpl");
        assert!(script.contains(" inst.ks=http://10.0.0.1:8081/boot/ks?t=abc "), "{script}");
    }

    /// An endpoint goes verbatim into shell strings: anything but a plain
    /// path is refused when the registry is built.
    #[test]
    fn endpoints_are_checked() {
        let config = PxeConfig::new("http://10.0.0.1:8081", KEY);
        for bad in ["ks?t=", "/ks?t='$(reboot)'", "/a b", "/x`y`"] {
            let e = InstallEndpoints { kickstart: bad.into(), ..endpoints("") };
            assert!(matches!(Templates::new(&config, e), Err(PxeError::Config(_))), "{bad}");
        }
    }
}

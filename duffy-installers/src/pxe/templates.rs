//! The iPXE and kickstart templates: built-in ones, an operator's
//! directory of overrides, and rendering.

use std::collections::BTreeMap;
use std::path::Path;

use super::PxeError;
use crate::template;

/// The built-in iPXE template.
pub const DEFAULT_IPXE_TEMPLATE: &str = include_str!("../templates/ipxe.tmpl");

/// The built-in kickstart template (Anaconda, EL7 and later).
pub const DEFAULT_KICKSTART_TEMPLATE: &str = include_str!("../templates/ks.tmpl");

/// An iPXE script that boots the local disk: what the HTTP layer can serve
/// a machine that PXE-boots with no install pending.
pub const LOCAL_BOOT_SCRIPT: &str =
    "#!ipxe\n# Duffy: no install pending for this machine; boot from the local disk.\nexit\n";

/// Every placeholder the iPXE and kickstart templates may use:
///
/// - `hostname`, `ip` (empty when unknown), `hardware_arch`: the node;
/// - `release`, `arch`, `flavor` (empty when none): the image;
/// - `kernel_url`, `initrd_url`, `repo_url`: the image's boot files and
///   package repository (see [`PxeConfig`](super::PxeConfig));
/// - `kickstart_url`: `{public_url}/Install/kickstart?token=…`;
/// - `callback_done`: `{public_url}/Install/done?token=…` (append
///   `&host_key=…`, e.g. with `curl -G --data-urlencode`);
/// - `callback_failed`: `{public_url}/Install/failed?token=…` (append
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

/// The URLs of one image.
pub(super) struct ImageUrls {
    pub(super) kernel: String,
    pub(super) initrd: String,
    pub(super) repo: String,
}

pub(super) fn render(name: &str, text: &str, vars: &[(&'static str, String)]) -> Result<String, PxeError> {
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    template::render(text, &vars).map_err(|source| PxeError::Template { name: name.to_string(), source })
}

pub(super) fn load_templates(dir: &Path) -> Result<BTreeMap<String, String>, PxeError> {
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

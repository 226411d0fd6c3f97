//! # duffy-installers
//!
//! Real implementations of duffy-core's [`Installer`](duffy_core::Installer)
//! trait: how a machine of the farm gets a fresh OS, and how an installed
//! machine gets the SSH keys of the project it is handed to.
//!
//! - [`pxe`]: network installs. [`PxeInstaller`] registers a pending install
//!   under a random one-time token in a shared [`PxeRegistry`], sets the
//!   machine's next boot to PXE and power-cycles it through a
//!   [`PowerController`](duffy_core::PowerController). The machine fetches
//!   its iPXE script and kickstart from Duffy's HTTP service (which calls
//!   the registry), installs, and calls back with its SSH host key; the
//!   callback wakes the waiting install.
//! - [`command`]: [`CommandInstaller`] runs an operator's command (an
//!   Ansible playbook wrapper, say) with the node and image as JSON on stdin
//!   and in environment variables, with a timeout that kills the whole
//!   process group.
//! - [`by_pool`]: [`ByPool`] installs each pool's image with the installer
//!   chosen for that pool (the others with a default one).
//! - [`ssh`]: [`SshContextualizer`] pushes the project's public keys to the
//!   node's `authorized_keys` over the system OpenSSH client, checking the
//!   host key the install recorded: duffy-core's
//!   [`Contextualizer`](duffy_core::Contextualizer), set on the engine
//!   beside the installer.
//!
//! Also: [`template`], the tiny `{{name}}` renderer behind the PXE templates,
//! and [`keys`], the OpenSSH public key validation every module shares.
//!
//! No secret is ever logged: install tokens appear in logs as an 8-character
//! prefix only, and private keys are referenced by path.

pub mod by_pool;
pub mod command;
pub mod keys;
mod process;
pub mod pxe;
pub mod ssh;
pub mod template;
mod util;

pub use by_pool::ByPool;
pub use command::{CommandConfig, CommandError, CommandInstaller};
pub use duffy_core::time::parse_duration;
pub use keys::{KeyError, PublicKey};
pub use pxe::{InstallEndpoints, PxeConfig, PxeError, PxeImage, PxeInstaller, PxeRegistry};
pub use ssh::{SshConfig, SshContextualizer, SshError};
pub use template::TemplateError;

//! [`ByPool`]: one installer per pool, for a farm whose pools are not all
//! installed the same way (PXE for most, an operator's command for one).

use std::sync::Arc;

use async_trait::async_trait;
use duffy_core::{InstallError, Installed, Installer, Node, PoolKey};

/// An [`Installer`] that installs each pool's image with the installer
/// chosen for that pool, and every other image with a default one.
///
/// ```
/// # use std::sync::Arc;
/// # use duffy_core::{Arch, Installer, PoolKey};
/// # use duffy_installers::ByPool;
/// # fn build(pxe: Arc<dyn Installer>, ansible: Arc<dyn Installer>) -> Arc<dyn Installer> {
/// Arc::new(ByPool::new(pxe).pool(PoolKey::new("9", Arch::Aarch64, None), ansible))
/// # }
/// ```
pub struct ByPool {
    default: Arc<dyn Installer>,
    pools: Vec<(PoolKey, Arc<dyn Installer>)>,
}

impl ByPool {
    /// Installs every image with `default` until [`ByPool::pool`] chooses
    /// another installer for a pool.
    pub fn new(default: Arc<dyn Installer>) -> Self {
        ByPool { default, pools: Vec::new() }
    }

    /// Installs `pool`'s image with `installer` (replacing an earlier
    /// choice for the same pool).
    pub fn pool(mut self, pool: PoolKey, installer: Arc<dyn Installer>) -> Self {
        self.pools.retain(|(p, _)| *p != pool);
        self.pools.push((pool, installer));
        self
    }

    /// Whether any pool has an installer of its own: without, the default
    /// installer alone does the same.
    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }

    /// The installer of `image`'s pool.
    fn installer_for(&self, image: &PoolKey) -> &Arc<dyn Installer> {
        self.pools.iter().find(|(p, _)| p == image).map(|(_, i)| i).unwrap_or(&self.default)
    }
}

impl std::fmt::Debug for ByPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pools: Vec<String> = self.pools.iter().map(|(p, _)| p.to_string()).collect();
        f.debug_struct("ByPool").field("pools_with_their_own_installer", &pools).finish_non_exhaustive()
    }
}

#[async_trait]
impl Installer for ByPool {
    async fn install(&self, node: &Node, image: &PoolKey) -> Result<Installed, InstallError> {
        self.installer_for(image).install(node, image).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use duffy_core::model::NewNode;
    use duffy_core::{Arch, NodeId, Timestamp};

    use super::*;

    /// Records the images it was asked to install, under its name.
    struct Named(&'static str, Mutex<Vec<String>>);

    #[async_trait]
    impl Installer for Named {
        async fn install(&self, _node: &Node, image: &PoolKey) -> Result<Installed, InstallError> {
            self.1.lock().unwrap_or_else(|e| e.into_inner()).push(image.to_string());
            Err(InstallError::new(self.0))
        }
    }

    #[tokio::test]
    async fn each_pool_gets_its_own_installer_and_the_rest_the_default() {
        let default = Arc::new(Named("default", Mutex::default()));
        let arm = Arc::new(Named("arm", Mutex::default()));
        // aarch64 pools default to the "tiny" flavor.
        let arm_pool = PoolKey::new("9", Arch::Aarch64, None);
        let by_pool = ByPool::new(default.clone()).pool(arm_pool.clone(), arm.clone());
        let node = NewNode::new("n1.example.org", Arch::Aarch64).into_node(NodeId(1), Timestamp(0));

        let e = by_pool.install(&node, &arm_pool).await.expect_err("the fake fails");
        assert_eq!(e.message, "arm");
        let e = by_pool.install(&node, &PoolKey::new("8", Arch::Aarch64, None)).await.expect_err("fails");
        assert_eq!(e.message, "default");
        assert_eq!(*arm.1.lock().expect("lock"), ["9/aarch64/tiny"]);
        assert_eq!(*default.1.lock().expect("lock"), ["8/aarch64/tiny"]);
        assert!(!by_pool.is_empty() && ByPool::new(default).is_empty());
    }
}

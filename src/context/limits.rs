//! The live limits: the device budget and the host limit changed while layers are in use.

use super::Context;
use crate::budget::{Limit, UNLIMITED};
use crate::error::Result;
use crate::log::Level;

impl Context {
    /// Sets the device budget. Unused resident layers are evicted down to it before this returns;
    /// layers in use leave when released. A larger budget lets waiting acquires go on.
    pub fn set_vram_limit(&self, bytes: u64) -> Result<()> {
        let mut st = self.lock();
        let old = st.budget.limit;
        st.budget.limit = Limit::from_abi(bytes);
        // A fill the copy engine charged under the old cap ends soon (the engine never waits on a
        // caller); what it filled is then as evictable as any other unused layer.
        while st.engine_filling.is_some() {
            st = self.wait(st)?;
        }
        // Under the old cap the engine may have filled layers ahead that budget 0 does not keep:
        // only the next prefetch_depth may stay. An acquire waiting for one that goes fills it
        // itself.
        self.drop_stale_prefetches(&mut st, false);
        let evicted = self.trim_to_cap(&mut st);
        self.backend.set_memory_cap(bytes)?;
        self.logger.log(Level::Info, || {
            format!(
                "vram_limit {old} -> {}: evicted {evicted} layers, {} bytes held",
                st.budget.limit,
                st.budget.in_use()
            )
        });
        self.wake(st.waiters);
        Ok(())
    }

    /// Sets the host memory limit for disk-tier copies and staging. The host counter holds it, so
    /// whatever bounds host memory reads the live value there.
    pub fn set_host_limit(&self, bytes: u64) -> Result<()> {
        let old = self.host.limit();
        self.host.set_limit(bytes);
        let shown = |b: u64| match b {
            UNLIMITED => "unlimited".to_string(),
            b => format!("{b} bytes"),
        };
        self.logger.log(Level::Info, || {
            format!("host_limit {} -> {}", shown(old), shown(bytes))
        });
        Ok(())
    }
}

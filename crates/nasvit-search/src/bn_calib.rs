//! BN re-calibration of a subnet for the search's `(images, labels)` batches: [`Calibrate`] checks the batches and
//! runs the model's native re-calibration ([`nasvit_model::Supernet::calibrate_bn`], cumulative average of the
//! batch statistics over N training batches, NASVIT.md 5.1).

use nasvit_model::{ModelError, Supernet};
use nasvit_space::Arch;

use crate::error::{Result, SearchError};
use crate::evaluate::Batch;

pub use nasvit_model::{Calibration as CalibReport, DEFAULT_CALIB_BATCHES};

/// Models whose BN running statistics can be re-calibrated for one subnet.
pub trait Calibrate {
    /// Makes `arch` active, and sets the statistics of its BN channels to the cumulative average over at most
    /// `max_batches` of `batches` (training-mode forward, no gradient).
    fn recalibrate_bn<I>(&mut self, arch: &Arch, batches: I, max_batches: usize) -> Result<CalibReport>
    where
        I: IntoIterator<Item = Batch>;
}

impl Calibrate for Supernet {
    fn recalibrate_bn<I>(&mut self, arch: &Arch, batches: I, max_batches: usize) -> Result<CalibReport>
    where
        I: IntoIterator<Item = Batch>,
    {
        // The labels are not used; a batch whose labels do not match its images is a caller's bug made visible.
        let mut bad = None;
        let images = batches.into_iter().take(max_batches).map_while(|(x, labels)| {
            let b = x.dims()[0];
            if b != labels.len() {
                bad = Some(format!("a calibration batch of {b} images has {} labels", labels.len()));
                return None;
            }
            Some(x)
        });
        let report = self.calibrate_bn(arch, images, max_batches).map_err(|e| match e {
            ModelError::Calibration(m) => SearchError::Calibration(m),
            e => SearchError::Model(e),
        });
        match bad {
            Some(m) => Err(SearchError::Calibration(m)),
            None => report,
        }
    }
}

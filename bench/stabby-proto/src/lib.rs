//! The template plugin's `measure` (a constant), exported through stabby instead of
//! abi_stable: one JSON answer, the same text warden's ABI carries, built in the plugin
//! and returned as an ABI-stable `stabby::string::String`. Synchronous: stabby's stable
//! futures (`stabby::future`) would be the next step of a real move (see
//! docs/plugins.md, "A second ABI").

use serde::Serialize;

#[derive(Serialize)]
struct Measurement {
    value: f64,
}

/// The instance: a boxed constant behind an opaque pointer, as a plugin keeps its state.
pub struct Constant {
    value: f64,
}

#[stabby::export]
pub extern "C" fn warden_stabby_new(value: f64) -> usize {
    Box::into_raw(Box::new(Constant { value })) as usize
}

#[stabby::export]
pub extern "C" fn warden_stabby_measure(instance: usize) -> stabby::string::String {
    // SAFETY: `instance` is what `warden_stabby_new` returned, never freed here.
    let c = unsafe { &*(instance as *const Constant) };
    let text = serde_json::to_string(&Measurement { value: c.value }).unwrap_or_default();
    stabby::string::String::from(text.as_str())
}

//! A shared library that loads fine but is not a plugin (no `prefix_rft_plugin` symbol): the
//! host must refuse it with "not a prefix-rft plugin". Stands in for any system `.so` without
//! depending on which ones a machine has.

/// An unrelated export, so the library is not empty.
#[unsafe(no_mangle)]
pub extern "C" fn not_a_plugin_add(a: u32, b: u32) -> u32 {
    a.wrapping_add(b)
}

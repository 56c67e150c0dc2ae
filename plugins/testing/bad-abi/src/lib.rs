//! Exports the plugin entry symbol with a table from a future ABI version (2) whose layout
//! this host does not know. The host must refuse it after reading only the version, naming
//! both versions. Written by hand, without `export_plugin!`, as a plugin built against another
//! copy of the ABI crate would look.

/// The version-2 table as imagined here: the header stays first, the rest changed.
#[repr(C)]
pub struct FutureTable {
    /// ABI version, at offset 0 as every version promises.
    pub abi_version: u32,
    /// A field the host must never read.
    pub future_field: usize,
}

/// The table a version-2 plugin would return.
static TABLE: FutureTable = FutureTable {
    abi_version: 2,
    future_field: 0xdead_beef,
};

/// The entry symbol, with the signature that never changes.
#[unsafe(no_mangle)]
pub extern "C" fn prefix_rft_plugin() -> *const FutureTable {
    &TABLE
}

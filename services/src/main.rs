//! The `edgebus` command line; see [`edgebus_services::cli`].

use std::process::ExitCode;

/// jemalloc: memory a connection reserves but never touches (rumqttd sizes several queues per
/// connection up front) costs address space, not RSS, and freed memory goes back to the OS.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings for a small host: two arenas instead of four per core, and dirty pages
/// returned to the OS after a second instead of ten (`MALLOC_CONF` still overrides).
#[allow(unsafe_code, non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 47] = b"narenas:2,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// Returns every arena's unused dirty pages to the OS (the broker calls it once it is quiet).
#[allow(unsafe_code)]
fn purge_arenas() {
    // "arena.<MALLCTL_ARENAS_ALL>.purge" takes and returns nothing.
    let name = b"arena.4096.purge\0";
    // SAFETY: a valid NUL-terminated mallctl name, and null pointers for a control that
    // neither reads nor writes a value.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
}

fn main() -> ExitCode {
    edgebus_broker::set_heap_trimmer(purge_arenas);
    edgebus_services::cli::main(std::env::args_os())
}

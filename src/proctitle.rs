//! The process title: what `ps`, `top -c` and `/proc/PID/cmdline` show for a process.
//!
//! `ps` prints `/proc/PID/cmdline`, which the kernel reads from the memory where it laid out the
//! process's argument strings, followed by its environment strings; `PR_SET_NAME` changes only the
//! 15-byte name `top` shows by default. So, as PostgreSQL's ps_status.c does on Linux, [`init`]
//! moves the environment strings to the heap and [`set`] writes the title over the whole area,
//! padded with NULs. When the title outgrows the argument strings, the kernel sees their last byte
//! is no longer NUL and reads the title up to its first NUL instead.
//!
//! [`init`] runs once, in the supervisor before it forks or starts anything (it rewrites
//! `environ`, which is only safe while the process has one thread); forked processes inherit the
//! prepared area and write their own titles into their copy of it. After it, `std::env::args()`
//! reads the title, not the original arguments (forkq parses them before).

use std::ffi::{c_char, CStr, CString};
use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

/// Start of the writable title area (null until [`init`] found one).
static AREA: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
/// Its length in bytes, the last of which always stays NUL.
static AREA_LEN: AtomicUsize = AtomicUsize::new(0);
/// How many bytes the last title used, so a shorter one clears only what is left of it.
static USED: AtomicUsize = AtomicUsize::new(0);

/// The longest title written; longer ones are cut.
const MAX_TITLE: usize = 128;

extern "C" {
    static mut environ: *mut *mut c_char;
}

/// Where the kernel put this process's argument and environment strings, from /proc/self/stat
/// (fields 48 to 51: arg_start, arg_end, env_start, env_end).
fn string_areas() -> Option<[usize; 4]> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which may itself contain spaces and parentheses; the
    // first of them is field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<usize>().ok();
    let areas = [field(48)?, field(49)?, field(50)?, field(51)?];
    (areas[0] != 0 && areas[0] < areas[1]).then_some(areas)
}

/// Prepares the title area: moves every environment string that lives in it to the heap, so the
/// whole area can hold the title. Without /proc (or with an area it does not recognise) titles
/// are left alone. Must run before the process has a second thread; later calls change nothing.
pub fn init() {
    if !AREA.load(Ordering::Acquire).is_null() {
        return;
    }
    let Some([arg_start, arg_end, env_start, env_end]) = string_areas() else {
        return;
    };
    // The kernel shows the environment strings as part of the title only when they follow the
    // argument strings directly.
    let end = if env_start == arg_end && env_end > env_start {
        // SAFETY: the process is single-threaded (see above), so nothing reads or changes
        // `environ` meanwhile; each entry is a valid NUL-terminated string set up by the kernel or
        // libc, and the copies are leaked on purpose: the environment lives as long as the process.
        unsafe {
            let mut entry = environ;
            while !entry.is_null() && !(*entry).is_null() {
                let address = *entry as usize;
                if (env_start..env_end).contains(&address) {
                    *entry = CStr::from_ptr(*entry).to_owned().into_raw();
                }
                entry = entry.add(1);
            }
        }
        env_end
    } else {
        arg_end
    };
    keep_program_name();
    AREA_LEN.store(end - arg_start, Ordering::Release);
    // Everything in the area counts as used, so the first title clears the rest of it.
    USED.store(end - arg_start, Ordering::Release);
    AREA.store(arg_start as *mut u8, Ordering::Release);
}

/// glibc keeps pointers into argv[0] for `program_invocation_name` (used in its own messages);
/// point them at copies before argv[0] is overwritten.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_program_name() {
    extern "C" {
        static mut program_invocation_name: *mut c_char;
        static mut program_invocation_short_name: *mut c_char;
    }
    // SAFETY: single-threaded (see `init`); both are NUL-terminated strings or null.
    unsafe {
        for name in [
            std::ptr::addr_of_mut!(program_invocation_name),
            std::ptr::addr_of_mut!(program_invocation_short_name),
        ] {
            if !(*name).is_null() {
                *name = CStr::from_ptr(*name).to_owned().into_raw();
            }
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_program_name() {}

/// Shows `title` in `ps`. Formats into a buffer on the stack (it runs once per job); a no-op
/// until [`init`] prepared the area.
pub fn set(title: fmt::Arguments<'_>) {
    let area = AREA.load(Ordering::Acquire);
    if area.is_null() {
        return;
    }
    let mut buffer = [0u8; MAX_TITLE];
    let mut cursor = &mut buffer[..];
    // A title longer than the buffer is cut, which is what the error means here.
    let _ = cursor.write_fmt(title);
    let written = MAX_TITLE - cursor.len();
    let len = written.min(AREA_LEN.load(Ordering::Acquire) - 1);
    let used = USED.swap(len, Ordering::AcqRel);
    // SAFETY: `area` and its length come from /proc/self/stat for this process (or its forked
    // parent, whose memory layout a fork keeps): the kernel's own argument and environment
    // strings, writable stack memory that nothing reads any more (the environment was moved).
    unsafe {
        std::ptr::copy_nonoverlapping(buffer.as_ptr(), area, len);
        if used > len {
            std::ptr::write_bytes(area.add(len), 0, used - len);
        }
    }
}

/// Sets the short name `top` and `ps -o comm` show (the kernel keeps 15 bytes of it).
pub fn set_name(name: &str) {
    if let Ok(name) = CString::new(name) {
        let _ = nix::sys::prctl::set_name(&name);
    }
}

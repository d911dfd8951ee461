//! libnftables, the library the `nft` program is a front end to, called in this process.
//!
//! Why in process: closing an nf_tables netlink socket waits until the kernel has finished
//! cleaning up after the last commit, an RCU grace period (10-20 ms on a quiet machine, far
//! more under emulation). An `nft` process pays that wait in its exit, and whoever waits for
//! the process pays it too. Here the context, and with it its socket, outlives the command: it
//! is freed when the next command comes or after [`IDLE`] without one, by which time the grace
//! period is usually over and the close costs nothing.
//!
//! Everything goes through one worker thread, one context at a time, as in the `nft` program.
//! libnftables keeps process-wide state (its interface cache among others) and is not made for
//! calls from several threads at once. For every script the worker first enters the script's
//! network namespace, so a context is only ever made inside the namespace it is for: its socket
//! belongs to the namespace the thread is in when it is made. When idle it returns to the
//! namespace it started in, so that it keeps no namespace alive.
//!
//! Only loading goes this way. Reading the ruleset back (`nft -j list`) stays with the `nft`
//! program: see `firewall`.

use std::ffi::{CStr, CString, c_char, c_int};
use std::io::{Error, ErrorKind, Result};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use nix::sched::{CloneFlags, setns};

/// How long a context is kept after its script.
const IDLE: Duration = Duration::from_millis(200);
/// What an error text may hold; the rest is cut off.
const OUTPUT_LIMIT: usize = 16 << 20;
/// The name errors give the script, in place of the descriptor path it was read from.
pub const SOURCE_NAME: &str = "ruleset";

#[repr(C)]
struct NftCtx {
    _private: [u8; 0],
}

/// Where the library is: the NixOS package sets its store path at build time; elsewhere the
/// dynamic loader finds it by its soname.
const LIBRARY_PATH: &str = match option_env!("WG_NAMESPACE_LIBNFTABLES") {
    Some(path) => path,
    None => "libnftables.so.1",
};

/// The library's entry points. It is loaded on first use, not linked: commands that never load
/// rules (`down`, `exec`, `status`, ...) do not pay for loading it and the libraries it needs.
struct Library {
    ctx_new: NewContext,
    ctx_free: FreeContext,
    buffer_error: BufferErrors,
    get_error_buffer: ErrorText,
    run_cmd_from_filename: RunFile,
}

type NewContext = unsafe extern "C" fn(u32) -> *mut NftCtx;
type FreeContext = unsafe extern "C" fn(*mut NftCtx);
type BufferErrors = unsafe extern "C" fn(*mut NftCtx) -> c_int;
type ErrorText = unsafe extern "C" fn(*mut NftCtx) -> *const c_char;
type RunFile = unsafe extern "C" fn(*mut NftCtx, *const c_char) -> c_int;

fn library() -> Result<&'static Library> {
    static LIBRARY: OnceLock<std::result::Result<Library, String>> = OnceLock::new();
    LIBRARY
        .get_or_init(load_library)
        .as_ref()
        .map_err(|e| Error::new(ErrorKind::NotFound, e.clone()))
}

fn load_library() -> std::result::Result<Library, String> {
    let path = CString::new(LIBRARY_PATH).map_err(|_| "the library path holds a NUL byte")?;
    let failed = |what: &str| {
        // SAFETY: dlerror returns NULL or a NUL-terminated string owned by libc.
        let reason = unsafe { copied(libc::dlerror()) };
        format!("{what} {LIBRARY_PATH} (is nftables installed?): {reason}")
    };
    // SAFETY: loading a library runs its initialisers; libnftables' only set up its own state.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Err(failed("loading"));
    }
    macro_rules! symbol {
        ($name:literal, $type:ty) => {{
            // SAFETY: the name is NUL-terminated; the symbol has the type libnftables.h gives
            // it, which the field it goes into spells out.
            let address = unsafe { libc::dlsym(handle, concat!($name, "\0").as_ptr().cast()) };
            if address.is_null() {
                return Err(failed(concat!("finding ", $name, " in")));
            }
            // SAFETY: see above.
            unsafe { std::mem::transmute::<*mut libc::c_void, $type>(address) }
        }};
    }
    Ok(Library {
        ctx_new: symbol!("nft_ctx_new", NewContext),
        ctx_free: symbol!("nft_ctx_free", FreeContext),
        buffer_error: symbol!("nft_ctx_buffer_error", BufferErrors),
        get_error_buffer: symbol!("nft_ctx_get_error_buffer", ErrorText),
        run_cmd_from_filename: symbol!("nft_run_cmd_from_filename", RunFile),
    })
}

const NFT_CTX_DEFAULT: u32 = 0;

/// Whether a script loaded (nft's exit status 0), and what libnftables printed as errors.
#[derive(Debug)]
pub struct Outcome {
    pub success: bool,
    pub error: String,
}

/// Runs the nft script `text` (several lines, as `nft -f` reads a file: error messages name the
/// line) inside the network namespace `netns`, waiting at most `limit`.
pub fn run_script(netns: BorrowedFd<'_>, text: &str, limit: Duration) -> Result<Outcome> {
    let (reply, answer) = mpsc::channel();
    let request = Request {
        netns: netns.try_clone_to_owned()?,
        script: script_file(text)?,
        reply,
    };
    submit(request)?;
    match answer.recv_timeout(limit) {
        Ok(outcome) => outcome,
        Err(RecvTimeoutError::Timeout) => Err(Error::new(
            ErrorKind::TimedOut,
            format!("libnftables did not answer within {} s", limit.as_secs()),
        )),
        Err(RecvTimeoutError::Disconnected) => Err(Error::other("the libnftables worker stopped")),
    }
}

struct Request {
    netns: OwnedFd,
    /// A memory file holding the script: libnftables reads it by path.
    script: OwnedFd,
    reply: Sender<Result<Outcome>>,
}

/// The worker's queue; None until the first script, and again after the worker has failed.
static QUEUE: Mutex<Option<Sender<Request>>> = Mutex::new(None);

fn submit(request: Request) -> Result<()> {
    let mut queue = QUEUE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(sender) = queue.as_ref() {
        match sender.send(request) {
            Ok(()) => return Ok(()),
            // The worker is gone: start another with the same request.
            Err(mpsc::SendError(returned)) => return start_worker(&mut queue, returned),
        }
    }
    start_worker(&mut queue, request)
}

fn start_worker(queue: &mut Option<Sender<Request>>, first: Request) -> Result<()> {
    let home = std::fs::File::open("/proc/thread-self/ns/net")?;
    let (sender, requests) = mpsc::channel();
    sender
        .send(first)
        .map_err(|_| Error::other("the libnftables queue closed"))?;
    std::thread::Builder::new()
        .name("libnftables".into())
        .spawn(move || work(home.into(), requests))?;
    *queue = Some(sender);
    Ok(())
}

/// A libnftables context, made inside the namespace of the script it ran.
struct Context {
    raw: *mut NftCtx,
    library: &'static Library,
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: `raw` came from nft_ctx_new, is freed only here, and only the worker thread
        // uses it.
        unsafe { (self.library.ctx_free)(self.raw) }
    }
}

fn work(home: OwnedFd, requests: Receiver<Request>) {
    let mut kept: Option<Context> = None;
    loop {
        let request = if kept.is_none() {
            match requests.recv() {
                Ok(request) => request,
                Err(_) => return,
            }
        } else {
            match requests.recv_timeout(IDLE) {
                Ok(request) => request,
                Err(RecvTimeoutError::Timeout) => {
                    kept = None;
                    if setns(&home, CloneFlags::CLONE_NEWNET).is_err() {
                        // A worker that cannot leave a namespace must not serve another one.
                        *QUEUE.lock().unwrap_or_else(|e| e.into_inner()) = None;
                        return;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        };
        let outcome = serve(&mut kept, &request);
        let _ = request.reply.send(outcome);
    }
}

fn serve(kept: &mut Option<Context>, request: &Request) -> Result<Outcome> {
    let library = library()?;
    // The previous script's context goes first: one at a time.
    *kept = None;
    setns(&request.netns, CloneFlags::CLONE_NEWNET)?;
    let before = open_descriptors()?;
    // SAFETY: plain constructor; NULL is checked below.
    let raw = unsafe { (library.ctx_new)(NFT_CTX_DEFAULT) };
    if raw.is_null() {
        return Err(Error::other("libnftables could not make a context"));
    }
    let context = Context { raw, library };
    // SAFETY: `raw` is a live context.
    let buffered = unsafe { (library.buffer_error)(raw) == 0 };
    if !buffered {
        return Err(Error::other("libnftables could not buffer its output"));
    }
    *kept = Some(context);
    // SAFETY: `raw` is a live context owned by this thread; the strings outlive the calls; the
    // buffers libnftables returns are valid until its next call on the context and are copied
    // before that.
    unsafe {
        let path = descriptor_path(&request.script);
        let status = (library.run_cmd_from_filename)(raw, path.as_ptr());
        // Once for the context's socket and whatever the script opened: nothing forks before.
        close_on_exec_since(&before);
        let error = copied((library.get_error_buffer)(raw))
            .replace(path.to_str().unwrap_or_default(), SOURCE_NAME);
        Ok(Outcome {
            success: status == 0,
            error,
        })
    }
}

/// The calling process's open descriptors (not counting the one this reads them through).
fn open_descriptors() -> Result<Vec<RawFd>> {
    use nix::dir::Dir;
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    let mut listing = Dir::open(
        "/proc/self/fd",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let own = listing.as_raw_fd();
    let mut descriptors = Vec::new();
    for entry in listing.iter() {
        let name = entry?
            .file_name()
            .to_str()
            .ok()
            .and_then(|n| n.parse().ok());
        if let Some(fd) = name.filter(|&fd| fd != own) {
            descriptors.push(fd);
        }
    }
    Ok(descriptors)
}

/// Marks close-on-exec every descriptor opened since `before` was taken. libnftables opens its
/// netlink socket without that flag, and a socket root made for nf_tables carries root's right
/// to change the ruleset to whoever holds it: the daemon and the unprivileged relays `up`
/// starts next would inherit it. While the worker runs a script, the thread that asked for it
/// waits, so what is new is libnftables'.
fn close_on_exec_since(before: &[RawFd]) {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    for fd in open_descriptors().unwrap_or_default() {
        if !before.contains(&fd) {
            // SAFETY: only the flag of a descriptor that is open (or just closed: then EBADF,
            // ignored) changes.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
        }
    }
}

/// `text` in a memory file, for libnftables to read by path as `nft -f` reads a file, so that
/// its error messages name the line.
fn script_file(text: &str) -> Result<OwnedFd> {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let fd = memfd_create("wg-namespace-ruleset", MFdFlags::MFD_CLOEXEC)?;
    let mut file = std::fs::File::from(fd);
    std::io::Write::write_all(&mut file, text.as_bytes())?;
    Ok(file.into())
}

fn descriptor_path(file: &OwnedFd) -> CString {
    CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).expect("no NUL in a path")
}

/// # Safety
/// `text` is NULL or points to a NUL-terminated string.
unsafe fn copied(text: *const c_char) -> String {
    if text.is_null() {
        return String::new();
    }
    // SAFETY: the caller's promise.
    let bytes = unsafe { CStr::from_ptr(text) }.to_bytes();
    String::from_utf8_lossy(&bytes[..bytes.len().min(OUTPUT_LIMIT)]).into_owned()
}

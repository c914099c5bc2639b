//! The exit codes of the `vport` command: the one table every command, every `--help` text and
//! the README's "Exit codes" table take them from.
//!
//! A library error that can end a command says which code it maps to (for example
//! [`crate::usage::UsageError::exit_code`], [`crate::connect::ConnectError::exit_code`]); the
//! binary only forwards it. [`HELP`] is the text every subcommand shows after its options; a
//! unit test keeps it equal to [`render_help`] (the table rendered) and checks the README.

/// How a `vport` command ended. The discriminant is the process exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitCode {
    /// Everything asked for was done and every check passed (a conformance QUIRK is explained,
    /// not a failure; trace notes are not violations).
    Success = 0,
    /// The check failed: the VM ran, but the agent or a port did not behave as expected (no
    /// HELLO within `--timeout`, QEMU not showing the port open, a conformance case FAILed or
    /// ended in ERROR, QEMU exited under `boot`/`watch`), or a trace breaks a life-cycle rule.
    CheckFailed = 1,
    /// Usage error: bad arguments, or a bad value named on the command line (unknown port,
    /// duplicate, empty or malformed `--port`, a `--filter` that selects no case, an output file
    /// that cannot be created at the start). Nothing was built or booted.
    Usage = 2,
    /// Infrastructure failure: something vport needs is missing or broken (qemu, kernel,
    /// busybox or agent binary missing, a dynamically linked agent or busybox, image build or
    /// QEMU start failed, permission denied on a socket, a trace or report file that cannot be
    /// read, or written at the end).
    Infrastructure = 3,
    /// Busy: the port's chardev already serves another client (QEMU serves one client per
    /// chardev socket).
    Busy = 4,
    /// Interrupted by Ctrl-C, SIGTERM or SIGHUP; every QEMU vport started is killed first.
    Interrupted = 130,
}

impl ExitCode {
    /// Every code, in table order.
    pub const ALL: &'static [ExitCode] = &[
        ExitCode::Success,
        ExitCode::CheckFailed,
        ExitCode::Usage,
        ExitCode::Infrastructure,
        ExitCode::Busy,
        ExitCode::Interrupted,
    ];

    /// The process exit status.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// One-line meaning for `--help` and the README (the variant docs say more).
    pub fn summary(self) -> &'static str {
        match self {
            ExitCode::Success => "success",
            ExitCode::CheckFailed => {
                "the check failed: the VM ran, but the agent or a port misbehaved (a conformance case failed); \
                 trace check: violations found"
            }
            ExitCode::Usage => {
                "usage error: bad arguments, or a bad value on the command line (unknown port, duplicate or \
                 malformed --port, --filter matching no case, an output file that cannot be created); nothing \
                 was booted"
            }
            ExitCode::Infrastructure => {
                "infrastructure failure: qemu, kernel, busybox or agent missing, a dynamically linked agent or \
                 busybox, image build or QEMU start failed, permission denied on a socket, a file that cannot \
                 be read, or written at the end"
            }
            ExitCode::Busy => "busy: the port's chardev already serves another client",
            ExitCode::Interrupted => "interrupted (Ctrl-C, SIGTERM); QEMU is killed first",
        }
    }

    /// Exits the process with this code.
    pub fn exit(self) -> ! {
        std::process::exit(self.code())
    }
}

impl From<ExitCode> for i32 {
    fn from(c: ExitCode) -> i32 {
        c.code()
    }
}

/// Width of the text column of [`HELP`].
const HELP_WIDTH: usize = 100;

/// The exit-code table as `--help` shows it: [`ExitCode::ALL`] with their summaries, codes
/// right-aligned, text wrapped at 100 columns. [`HELP`] is this, as a constant.
pub fn render_help() -> String {
    let mut out = String::from("Exit codes:");
    for c in ExitCode::ALL {
        let indent = 2 + 3 + 2;
        let mut line = format!("\n  {:>3}  ", c.code());
        let mut col = indent;
        for word in c.summary().split_whitespace() {
            if col > indent && col + 1 + word.len() > HELP_WIDTH {
                line.push('\n');
                line.push_str(&" ".repeat(indent));
                col = indent;
            } else if col > indent {
                line.push(' ');
                col += 1;
            }
            line.push_str(word);
            col += word.len();
        }
        out.push_str(&line);
    }
    out
}

/// The `after_help` text of every `vport` command: [`render_help`] as a constant (clap wants a
/// `'static` string; a unit test keeps the two equal).
pub const HELP: &str = "Exit codes:
    0  success
    1  the check failed: the VM ran, but the agent or a port misbehaved (a conformance case failed);
       trace check: violations found
    2  usage error: bad arguments, or a bad value on the command line (unknown port, duplicate or
       malformed --port, --filter matching no case, an output file that cannot be created); nothing
       was booted
    3  infrastructure failure: qemu, kernel, busybox or agent missing, a dynamically linked agent or
       busybox, image build or QEMU start failed, permission denied on a socket, a file that cannot
       be read, or written at the end
    4  busy: the port's chardev already serves another client
  130  interrupted (Ctrl-C, SIGTERM); QEMU is killed first";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_is_the_rendered_table() {
        assert_eq!(HELP, render_help(), "update exit::HELP to:\n{}", render_help());
    }

    #[test]
    fn help_lists_every_code_once() {
        for c in ExitCode::ALL {
            let row = format!("\n  {:>3}  ", c.code());
            assert_eq!(HELP.matches(&row).count(), 1, "{c:?} ({}) in:\n{HELP}", c.code());
        }
        assert_eq!(HELP.lines().filter(|l| l.trim_start().starts_with(char::is_numeric)).count(), ExitCode::ALL.len());
    }

    #[test]
    fn codes_are_distinct_and_stable() {
        let codes: Vec<i32> = ExitCode::ALL.iter().map(|c| c.code()).collect();
        assert_eq!(codes, [0, 1, 2, 3, 4, 130]);
        assert_eq!(i32::from(ExitCode::Busy), 4);
    }

    /// README.md's "Exit codes" table has one row per code, in order, and no other.
    #[test]
    fn readme_table_lists_every_code() {
        let readme = include_str!("../../README.md");
        let section = readme.split("### Exit codes").nth(1).expect("README has an Exit codes section");
        let rows: Vec<i32> = section
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .filter_map(|l| l.trim_start_matches('|').split('|').next()?.trim().parse().ok())
            .collect();
        let codes: Vec<i32> = ExitCode::ALL.iter().map(|c| c.code()).collect();
        assert_eq!(rows, codes, "README's exit-code rows");
    }
}

//! `vport image build`, and the guest image every booting command prepares first.

use super::{stdout_err, CommandError, Progress};
use crate::image::{self, kernel::KernelSource, GuestImage, ImageRequest};
use std::io::Write;
use std::path::PathBuf;

/// Where the image's parts come from (`--kernel`, `--kernel-modules`, `--kernel-deb`,
/// `--agent`, `--busybox`; `None`: the defaults).
#[derive(Debug, Clone, Default)]
pub struct ImageChoice {
    /// A bzImage instead of the Debian kernel.
    pub kernel: Option<PathBuf>,
    /// The lib/modules/RELEASE directory that goes with `kernel`.
    pub kernel_modules: Option<PathBuf>,
    /// A linux-image-*.deb to take the kernel and modules from.
    pub kernel_deb: Option<PathBuf>,
    /// The static vport-agent.
    pub agent: Option<PathBuf>,
    /// A static busybox.
    pub busybox: Option<PathBuf>,
}

/// Builds the image (or reuses an identical one from the cache), saying so on `progress`.
pub fn prepare(choice: &ImageChoice, progress: &Progress) -> Result<GuestImage, CommandError> {
    let agent = image::resolve_agent(choice.agent.as_deref())?;
    let req = ImageRequest {
        kernel: KernelSource::from_args(
            choice.kernel.clone(),
            choice.kernel_modules.clone(),
            choice.kernel_deb.clone(),
        ),
        agent,
        busybox: choice.busybox.clone().unwrap_or_else(image::default_busybox),
        cache_dir: crate::cache::cache_dir(),
    };
    progress.say("preparing the guest image");
    let img = image::build(&req, &mut |m| progress.say(m))?;
    progress.say(&format!(
        "guest image {} (kernel {}){}",
        img.dir.display(),
        img.kernel_release,
        if img.fresh { "" } else { ", from the cache" }
    ));
    Ok(img)
}

/// `vport image build`: prepares the image and prints where its parts are (`json`: as one
/// JSON object).
pub fn build(choice: &ImageChoice, json: bool, out: &mut dyn Write, progress: &Progress) -> Result<(), CommandError> {
    let img = prepare(choice, progress)?;
    if json {
        let v = serde_json::json!({
            "dir": img.dir, "kernel": img.kernel, "initramfs": img.initramfs, "kernel_release": img.kernel_release,
            "modules": img.modules, "cmdline": img.cmdline, "fresh": img.fresh, "key": img.key,
        });
        writeln!(out, "{v}").map_err(stdout_err)
    } else {
        writeln!(
            out,
            "kernel      {}\ninitramfs   {}\nrelease     {}\nmodules     {}\ncmdline     {}",
            img.kernel.display(),
            img.initramfs.display(),
            img.kernel_release,
            img.modules.join(" "),
            img.cmdline
        )
        .map_err(stdout_err)
    }
}

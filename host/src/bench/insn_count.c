/*
 * vport's guest instruction counter: a QEMU TCG plugin.
 *
 * Every translated block adds its instruction count to one 64-bit counter, the first 8 bytes
 * (native endian) of the file named by the plugin's `out=PATH` argument, mapped shared: the
 * host reads the file while the guest runs and takes differences. It counts the instructions
 * of every block entered, kernel and user alike; a block left early (an exception, an
 * interrupt) still counts whole.
 *
 * Two builds, chosen by vport per VM (host/src/bench/insns.rs, `Variant`):
 * - plugin API version 1 (QEMU 4.2 to 8.x), one vCPU: an inline add QEMU emits into the block
 *   (the cheapest; not atomic, so exact with one vCPU only);
 * - -DVPORT_ATOMIC (any vCPU count) with -DVPORT_PLUGIN_API=2 on QEMU 9.0 and later, whose
 *   loader refuses version 1 and whose inline ops are per vCPU: a callback per block entered,
 *   which adds atomically. The callback API is the same in every version.
 *
 * It declares the few plugin entry points it uses itself rather than including qemu-plugin.h,
 * which Debian's QEMU packages do not ship. Built by `vport bench` with the system's C
 * compiler into vport's cache.
 */
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef VPORT_PLUGIN_API
#define VPORT_PLUGIN_API 1
#endif

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
extern void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
extern size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);

__attribute__((visibility("default"))) int qemu_plugin_version = VPORT_PLUGIN_API;

/* The counter: the first 8 bytes of the shared mapping of `out=`. */
static uint64_t *counter;

#ifdef VPORT_ATOMIC
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS };
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);
extern void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, qemu_plugin_vcpu_udata_cb_t cb,
                                                 enum qemu_plugin_cb_flags flags, void *userdata);

/* A block was entered on some vCPU: its instruction count, carried in the user data. */
static void on_exec(unsigned int vcpu_index, void *n_insns)
{
    (void)vcpu_index;
    __atomic_fetch_add(counter, (uint64_t)(uintptr_t)n_insns, __ATOMIC_RELAXED);
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    qemu_plugin_register_vcpu_tb_exec_cb(tb, on_exec, QEMU_PLUGIN_CB_NO_REGS,
                                         (void *)(uintptr_t)qemu_plugin_tb_n_insns(tb));
}
#else
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
extern void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op, void *ptr,
                                                     uint64_t imm);

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, counter, qemu_plugin_tb_n_insns(tb));
}
#endif

/* Maps `out=PATH` (made and sized by the host before QEMU starts); a non-zero return makes
 * QEMU refuse to start, with the plugin's name in its error. */
__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const void *info, int argc,
                                                               char **argv)
{
    const char *out = NULL;
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            out = argv[i] + 4;
        }
    }
    if (out == NULL) {
        return -1;
    }
    int fd = open(out, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        return -1;
    }
    void *map = mmap(NULL, sizeof(uint64_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        return -1;
    }
    counter = map;
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    return 0;
}

/*
 * fault: makes the VMM give up on the guest, on purpose (guest, CPL0).
 *
 *   fault=mmio-exec   jump into the virtio-mmio window, where no RAM is:
 *                     KVM cannot fetch instructions from MMIO and reports an
 *                     internal (emulation) error to the VMM.
 *
 * tenbox must end the VM with its KVM-error exit code and log the vCPU state.
 */
#include "bootparams.h"
#include "serial.h"
#include "test.h"

const char guest_name[] = "fault";

#define MMIO_NO_RAM 0xd0000000UL

void guest_main(void)
{
	char mode[32];

	t_start();
	if (!cmdline_get("fault", mode, sizeof(mode)))
		mode[0] = 0;
	if (mode[0] == 0 || !__builtin_strcmp(mode, "mmio-exec")) {
		t_info("fault", "mmio-exec at %lx", MMIO_NO_RAM);
		((void (*)(void))MMIO_NO_RAM)();
	}
	t_fail("the VMM ran an impossible instruction fetch (fault=%s)", mode);
}

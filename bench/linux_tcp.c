/*
 * linux_tcp: the guest side of bench/net.py --linux's transmit case (runs
 * inside the Linux guest; built static by bench/net.py). busybox nc copies
 * 1 KiB per system call, which under TCG measures the guest's kernel entry
 * rather than the network device; this sends in 64 KiB writes.
 *
 *   linux_tcp ADDR PORT MIB
 *
 * Connects, sends MIB MiB of zeros, then waits for the peer's "SINK-DONE"
 * line (QEMU's guestfwd is a chardev: the peer cannot close the guest's
 * connection) or for end of stream, and prints one line:
 *   LINUX-TCP: bytes=B secs=S
 * measured in the guest with CLOCK_MONOTONIC (the benchmark times the
 * host's end).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (64u << 10)

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	static char buf[CHUNK];
	if (argc != 4) {
		fprintf(stderr, "usage: linux_tcp ADDR PORT MIB\n");
		return 2;
	}
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2])) };
	unsigned long long total = strtoull(argv[3], NULL, 10) << 20, sent = 0;
	if (inet_pton(AF_INET, argv[1], &sa.sin_addr) != 1 || total == 0) {
		fprintf(stderr, "linux_tcp: bad arguments\n");
		return 2;
	}
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa))) {
		perror("linux_tcp: connect");
		return 1;
	}
	double t0 = now();
	while (sent < total) {
		size_t n = total - sent < CHUNK ? (size_t)(total - sent) : CHUNK;
		ssize_t w = write(fd, buf, n);
		if (w <= 0) {
			perror("linux_tcp: write");
			return 1;
		}
		sent += (unsigned long long)w;
	}
	char ack[64];
	size_t got = 0;
	for (;;) {
		ssize_t r = read(fd, ack + got, sizeof(ack) - 1 - got);
		if (r <= 0)
			break;
		got += (size_t)r;
		ack[got] = 0;
		if (strstr(ack, "SINK-DONE") || got == sizeof(ack) - 1)
			break;
	}
	double secs = now() - t0;
	close(fd);
	printf("LINUX-TCP: bytes=%llu secs=%.6f\n", sent, secs);
	return 0;
}

/*
 * linux_io: the guest side of bench/blk.py --linux (runs inside the Linux
 * guest, on its virtio-blk disk; built static by bench/blk.py).
 *
 *   linux_io DEVICE seqread  MIB  [QD]   O_DIRECT reads of 1 MiB, front to back
 *   linux_io DEVICE seqwrite MIB  [QD]   O_DIRECT writes of 1 MiB, front to back
 *   linux_io DEVICE randread OPS  [QD]   O_DIRECT reads of 4 KiB at random aligned offsets
 *
 * QD threads issue requests at once (a queue depth for the device). Prints
 * one line:  LINUX-IO: mode=M ops=N bytes=B secs=S
 * measured with CLOCK_MONOTONIC around the I/O alone.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

#define MIB (1u << 20)
#define QD_MAX 32

struct job {
	int fd;
	int mode; /* 0 seqread, 1 seqwrite, 2 randread */
	uint64_t first, step, count; /* this thread's share of the ops */
	uint64_t disk_bytes;
	unsigned seed;
	int failed;
};

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *run(void *arg)
{
	struct job *j = arg;
	size_t bs = j->mode == 2 ? 4096 : MIB;
	void *buf;
	if (posix_memalign(&buf, 4096, bs)) {
		j->failed = 1;
		return NULL;
	}
	memset(buf, 0x5a, bs);
	uint64_t blocks = j->disk_bytes / bs;
	for (uint64_t i = 0; i < j->count; i++) {
		uint64_t op = j->first + i * j->step;
		off_t off;
		if (j->mode == 2)
			off = (off_t)((((uint64_t)rand_r(&j->seed) << 31) ^ (uint64_t)rand_r(&j->seed)) % blocks) * bs;
		else
			off = (off_t)((op % blocks) * bs);
		ssize_t n = j->mode == 1 ? pwrite(j->fd, buf, bs, off) : pread(j->fd, buf, bs, off);
		if (n != (ssize_t)bs) {
			perror("linux_io: I/O");
			j->failed = 1;
			break;
		}
	}
	free(buf);
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: linux_io DEVICE seqread|seqwrite|randread MIB|OPS [QD]\n");
		return 2;
	}
	int mode = !strcmp(argv[2], "seqread") ? 0 : !strcmp(argv[2], "seqwrite") ? 1
		 : !strcmp(argv[2], "randread") ? 2 : -1;
	uint64_t amount = strtoull(argv[3], NULL, 10);
	int qd = argc > 4 ? atoi(argv[4]) : 1;
	if (mode < 0 || amount == 0 || qd < 1 || qd > QD_MAX) {
		fprintf(stderr, "linux_io: bad arguments\n");
		return 2;
	}
	int fd = open(argv[1], (mode == 1 ? O_WRONLY : O_RDONLY) | O_DIRECT);
	if (fd < 0) {
		perror(argv[1]);
		return 1;
	}
	uint64_t disk_bytes = 0;
	if (ioctl(fd, BLKGETSIZE64, &disk_bytes) || disk_bytes < MIB) {
		fprintf(stderr, "linux_io: cannot size %s\n", argv[1]);
		return 1;
	}
	uint64_t ops = amount;
	size_t bs = mode == 2 ? 4096 : MIB;
	struct job jobs[QD_MAX];
	pthread_t th[QD_MAX];
	double t0 = now();
	for (int i = 0; i < qd; i++) {
		jobs[i] = (struct job){ fd, mode, (uint64_t)i, (uint64_t)qd, ops / qd + (i < (int)(ops % qd)), disk_bytes,
					 0x1234u + i, 0 };
		pthread_create(&th[i], NULL, run, &jobs[i]);
	}
	int failed = 0;
	for (int i = 0; i < qd; i++) {
		pthread_join(th[i], NULL);
		failed |= jobs[i].failed;
	}
	if (mode == 1 && fdatasync(fd)) {
		perror("linux_io: fdatasync");
		failed = 1;
	}
	double secs = now() - t0;
	close(fd);
	if (failed)
		return 1;
	printf("LINUX-IO: mode=%s ops=%llu bytes=%llu secs=%.6f\n", argv[2], (unsigned long long)ops,
	       (unsigned long long)(ops * bs), secs);
	return 0;
}

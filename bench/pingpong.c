/*
 * A bare TCP request/response round trip on loopback: the reference that issue 8's QD1 latency goal
 * ("within 1.5x of a bare TCP round trip") is measured against. No iSCSI, no disk, blocking
 * sockets, TCP_NODELAY, one connection, one message in flight.
 *
 *   pingpong server PORT REQ_BYTES RESP_BYTES          # serves one connection, then exits
 *   pingpong client PORT REQ_BYTES RESP_BYTES ROUNDS   # prints "p50 p99 mean" in microseconds
 *
 * bench/run.sh compiles it with gcc and pins each end to a CPU with taskset. 48 bytes is an iSCSI
 * basic header segment; a 48-byte request with a 48 + 4096-byte response is a 4 KiB read's shape.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define WARMUP 2000

static void die(const char *what)
{
    perror(what);
    exit(1);
}

/* Moves exactly n bytes (recv and send may do less than asked). */
static void recv_all(int fd, char *buf, size_t n)
{
    while (n > 0) {
        ssize_t r = recv(fd, buf, n, 0);
        if (r <= 0)
            die("recv");
        buf += r;
        n -= (size_t)r;
    }
}

static void send_all(int fd, const char *buf, size_t n)
{
    while (n > 0) {
        ssize_t r = send(fd, buf, n, MSG_NOSIGNAL);
        if (r <= 0)
            die("send");
        buf += r;
        n -= (size_t)r;
    }
}

static void nodelay(int fd)
{
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
        die("TCP_NODELAY");
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static struct sockaddr_in loopback(int port)
{
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return sa;
}

static int serve(int port, size_t req, size_t resp, char *buf)
{
    struct sockaddr_in sa = loopback(port);
    int one = 1;
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    if (ls < 0)
        die("socket");
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0)
        die("bind");
    if (listen(ls, 1) < 0)
        die("listen");
    int fd = accept(ls, NULL, NULL);
    if (fd < 0)
        die("accept");
    nodelay(fd);
    for (;;) {
        /* The client closing the connection ends the server. */
        size_t got = 0;
        while (got < req) {
            ssize_t r = recv(fd, buf + got, req - got, 0);
            if (r <= 0)
                return 0;
            got += (size_t)r;
        }
        send_all(fd, buf, resp);
    }
}

static int client(int port, size_t req, size_t resp, long rounds, char *buf)
{
    struct sockaddr_in sa = loopback(port);
    int fd = -1;
    /* The server may still be starting: retry the connect for up to 2 s. */
    for (int i = 0; i < 200; i++) {
        fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            die("socket");
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0)
            break;
        close(fd);
        fd = -1;
        usleep(10000);
    }
    if (fd < 0)
        die("connect");
    nodelay(fd);
    uint64_t *lat = calloc((size_t)rounds, sizeof *lat);
    if (!lat)
        die("calloc");
    for (long i = 0; i < WARMUP + rounds; i++) {
        uint64_t t0 = now_ns();
        send_all(fd, buf, req);
        recv_all(fd, buf, resp);
        if (i >= WARMUP)
            lat[i - WARMUP] = now_ns() - t0;
    }
    close(fd);
    double sum = 0;
    for (long i = 0; i < rounds; i++)
        sum += (double)lat[i];
    qsort(lat, (size_t)rounds, sizeof *lat, cmp_u64);
    printf("%.1f %.1f %.1f\n", lat[rounds / 2] / 1e3, lat[rounds * 99 / 100] / 1e3, sum / rounds / 1e3);
    free(lat);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 5 || (strcmp(argv[1], "client") == 0 && argc < 6)) {
        fprintf(stderr, "usage: %s server PORT REQ RESP | client PORT REQ RESP ROUNDS\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[2]);
    size_t req = strtoul(argv[3], NULL, 10), resp = strtoul(argv[4], NULL, 10);
    if (req == 0 || resp == 0 || req > (1 << 20) || resp > (1 << 20)) {
        fprintf(stderr, "REQ and RESP must be 1..1048576 bytes\n");
        return 2;
    }
    char *buf = calloc(1, req > resp ? req : resp);
    if (!buf)
        die("calloc");
    if (strcmp(argv[1], "server") == 0)
        return serve(port, req, resp, buf);
    long rounds = atol(argv[5]);
    if (rounds < 100) {
        fprintf(stderr, "ROUNDS must be at least 100\n");
        return 2;
    }
    return client(port, req, resp, rounds, buf);
}

/*
 * The sessions rows' shape without iSCSI: S TCP connections on loopback, each with Q requests in
 * flight, against a bare single-threaded epoll server. It shows what the kernel alone charges per
 * round trip when the same total depth is spread over more connections (fewer messages per
 * syscall, one wake-up per response), on both sides.
 *
 *   mconn server PORT REQ_BYTES RESP_BYTES            # serves until killed
 *   mconn client PORT REQ_BYTES RESP_BYTES S Q SECS   # S threads, one connection each, Q in flight
 *
 * The server reads what has arrived on a ready connection (up to 64 KiB), and answers every whole
 * request in it with one send; the client thread sends Q requests, then one more per response.
 * The client prints "round trips/s". bench/ab.sh's "mconn" mode runs it beside the targets.
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXQ 256

static size_t req_len, resp_len;
static int port;
static volatile int stop;
static long done_total;
static pthread_mutex_t done_lock = PTHREAD_MUTEX_INITIALIZER;

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* Sends exactly n bytes; -1 when the peer is gone. */
static int send_all(int fd, const char *buf, size_t n)
{
    while (n > 0) {
        ssize_t r = send(fd, buf, n, MSG_NOSIGNAL);
        if (r < 0 && errno == EAGAIN)
            continue;
        if (r <= 0)
            return -1;
        buf += r;
        n -= (size_t)r;
    }
    return 0;
}

struct conn {
    int fd;
    size_t partial; /* bytes of an incomplete request already read */
};

static _Noreturn void server(void)
{
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(0x7f000001)};
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 1024))
        die("listen");
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev);
    char *in = malloc(65536), *out = calloc(MAXQ * 4, resp_len);
    struct epoll_event evs[128];
    for (;;) {
        int n = epoll_wait(ep, evs, 128, -1);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!c) {
                int fd = accept(l, NULL, NULL);
                if (fd < 0)
                    continue;
                nodelay(fd);
                c = calloc(1, sizeof *c);
                c->fd = fd;
                struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
                continue;
            }
            ssize_t r = recv(c->fd, in, 65536, MSG_DONTWAIT);
            size_t whole = 0;
            if (r > 0) {
                size_t total = c->partial + (size_t)r;
                whole = total / req_len;
                c->partial = total % req_len;
                if (whole > MAXQ * 4)
                    die("too many requests at once");
            }
            /* A client that stopped closes with requests in flight: drop it, keep serving. */
            if (r == 0 || (r < 0 && errno != EAGAIN) || (whole && send_all(c->fd, out, whole * resp_len))) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                close(c->fd);
                free(c);
                continue;
            }
        }
    }
}

static void *client_thread(void *arg)
{
    int q = *(int *)arg, fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(0x7f000001)};
    if (connect(fd, (struct sockaddr *)&a, sizeof a))
        die("connect");
    nodelay(fd);
    char req[4096] = {0}, *resp = malloc(resp_len * MAXQ);
    long done = 0;
    for (int i = 0; i < q; i++)
        if (send_all(fd, req, req_len))
            die("send");
    size_t have = 0;
    while (!stop) {
        ssize_t r = recv(fd, resp, resp_len * MAXQ, 0);
        if (r <= 0)
            die("recv");
        have += (size_t)r;
        size_t whole = have / resp_len;
        have %= resp_len;
        done += (long)whole;
        /* One send for every response that came in this read. */
        for (size_t i = 0; i < whole; i++)
            memcpy(resp + i * req_len, req, req_len);
        if (whole && send_all(fd, resp, whole * req_len))
            die("send");
    }
    pthread_mutex_lock(&done_lock);
    done_total += done;
    pthread_mutex_unlock(&done_lock);
    close(fd);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 5)
        goto usage;
    port = atoi(argv[2]);
    req_len = strtoul(argv[3], NULL, 10);
    resp_len = strtoul(argv[4], NULL, 10);
    if (!req_len || req_len > 4096 || !resp_len)
        goto usage;
    if (!strcmp(argv[1], "server"))
        server();
    if (strcmp(argv[1], "client") || argc != 8)
        goto usage;
    int s = atoi(argv[5]), q = atoi(argv[6]), secs = atoi(argv[7]);
    if (s < 1 || q < 1 || q > MAXQ || secs < 1)
        goto usage;
    pthread_t *t = calloc((size_t)s, sizeof *t);
    for (int i = 0; i < s; i++)
        pthread_create(&t[i], NULL, client_thread, &q);
    sleep((unsigned)secs);
    stop = 1;
    for (int i = 0; i < s; i++)
        pthread_join(t[i], NULL);
    printf("%.0f\n", (double)done_total / secs);
    return 0;
usage:
    fprintf(stderr, "usage: mconn server PORT REQ RESP | mconn client PORT REQ RESP S Q SECS\n");
    return 2;
}

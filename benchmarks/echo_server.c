/*
 * echo_server.c: a plain C epoll echo server, the network benchmarks' ceiling reference
 * (net.py's `c-epoll` column; compiled at run time with `cc -O2 ... -lssl -lcrypto`). No
 * Python, no event loop library: what echoing costs on this machine when the server's own code
 * costs next to nothing, so a row where even this server is below a target shows a target no
 * Python event loop can reach here.
 *
 *     echo_server KIND [--lifetime S] [--cpu N] [--certfile PEM --keyfile PEM]
 *
 * KIND: `sock`, `streams` or `protocol` (all the same plain echo server), or `tls` (the same
 * over TLS with OpenSSL, needing --certfile and --keyfile); any other kind prints
 * {"unsupported": ...} and exits with status 3, as net_server.py does for a loop that cannot
 * serve a kind. It behaves as net_server.py's `protocol` echo server: listens on 127.0.0.1 (a
 * free port, backlog 4096), TCP_NODELAY on every connection, echoes whatever arrives in the
 * chunks it arrives in (reads of up to 256 KiB), prints {"port", "pid", "rss_kib",
 * "peak_reset"} once it listens, stops when its stdin reaches end of file, and ends by itself
 * after --lifetime seconds (SIGALRM) in any case.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define HOST "127.0.0.1"
#define READ_SIZE (256 * 1024)
#define BACKLOG 4096
#define MAX_EVENTS 1024
#define UNSUPPORTED 3

/* One connection. Bytes that could not be written at once wait in `pending`; reading stops
 * until they are out (the client has one request in flight, so this is never a stall). */
struct conn {
    int fd;
    SSL *ssl;             /* NULL for plain TCP */
    int handshaking;      /* TLS: SSL_do_handshake not finished yet */
    unsigned char *pending;
    size_t pending_len, pending_off;
};

static int ep;
static SSL_CTX *ctx;
static unsigned char buf[READ_SIZE];
static struct conn listener_tag, stdin_tag; /* epoll data of the two special fds */

static void die(const char *what)
{
    fprintf(stderr, "echo_server: %s: %s\n", what, strerror(errno));
    ERR_print_errors_fp(stderr);
    exit(1);
}

static long status_kib(const char *field)
{
    char line[256];
    long value = 0;
    size_t len = strlen(field);
    FILE *f = fopen("/proc/self/status", "r");
    if (!f)
        return 0;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, field, len) && line[len] == ':')
            value = atol(line + len + 1);
    fclose(f);
    return value;
}

static void watch(struct conn *c, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        die("epoll_ctl");
}

static void drop(struct conn *c)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    if (c->ssl)
        SSL_free(c->ssl);
    close(c->fd);
    free(c->pending);
    free(c);
}

/* Write bytes out; returns how many were written, or -1 if the connection is dead. */
static ssize_t write_some(struct conn *c, const unsigned char *data, size_t len)
{
    if (c->ssl) {
        int n = SSL_write(c->ssl, data, (int)len);
        if (n > 0)
            return n;
        int e = SSL_get_error(c->ssl, n);
        return e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ ? 0 : -1;
    }
    ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
    if (n >= 0)
        return n;
    return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -1;
}

/* Echo `len` bytes of buf back; keep what does not fit for EPOLLOUT. 0, or -1: dead. */
static int echo(struct conn *c, size_t len)
{
    ssize_t n = write_some(c, buf, len);
    if (n < 0)
        return -1;
    if ((size_t)n < len) {
        c->pending = malloc(len - (size_t)n);
        if (!c->pending)
            return -1;
        memcpy(c->pending, buf + n, len - (size_t)n);
        c->pending_len = len - (size_t)n;
        c->pending_off = 0;
        watch(c, EPOLLOUT);
    }
    return 0;
}

/* Read and echo until the socket would block (TLS: until OpenSSL holds no more plaintext
 * either, since epoll cannot see what it already decrypted) or a write is left pending. */
static int on_readable(struct conn *c)
{
    while (!c->pending) {
        if (c->ssl) {
            int n = SSL_read(c->ssl, buf, READ_SIZE);
            if (n <= 0) {
                int e = SSL_get_error(c->ssl, n);
                return e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE ? 0 : -1;
            }
            if (echo(c, (size_t)n) < 0)
                return -1;
        } else {
            /* one read per wake-up, as asyncio's transports do: level-triggered epoll
             * reports the socket again if more is there */
            ssize_t n = recv(c->fd, buf, READ_SIZE, 0);
            if (n == 0)
                return -1;
            if (n < 0)
                return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -1;
            return echo(c, (size_t)n);
        }
    }
    return 0;
}

static int on_writable(struct conn *c)
{
    ssize_t n = write_some(c, c->pending + c->pending_off, c->pending_len - c->pending_off);
    if (n < 0)
        return -1;
    c->pending_off += (size_t)n;
    if (c->pending_off < c->pending_len)
        return 0;
    free(c->pending);
    c->pending = NULL;
    watch(c, EPOLLIN);
    return on_readable(c); /* TLS: plaintext may be waiting inside OpenSSL */
}

static int on_handshake(struct conn *c)
{
    int r = SSL_do_handshake(c->ssl);
    if (r == 1) {
        c->handshaking = 0;
        watch(c, EPOLLIN);
        return on_readable(c);
    }
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ)
        watch(c, EPOLLIN);
    else if (e == SSL_ERROR_WANT_WRITE)
        watch(c, EPOLLOUT);
    else
        return -1;
    return 0;
}

static void accept_all(int lfd)
{
    int one = 1;
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED ||
                errno == EINTR)
                return;
            die("accept4");
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* as asyncio's */
        struct conn *c = calloc(1, sizeof *c);
        if (!c)
            die("calloc");
        c->fd = fd;
        if (ctx) {
            c->ssl = SSL_new(ctx);
            SSL_set_fd(c->ssl, fd);
            SSL_set_accept_state(c->ssl);
            c->handshaking = 1;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
            die("epoll_ctl");
    }
}

int main(int argc, char **argv)
{
    const char *certfile = NULL, *keyfile = NULL;
    int lifetime = 120, cpu = -1;
    if (argc < 2) {
        fprintf(stderr, "usage: echo_server KIND [--lifetime S] [--cpu N] "
                        "[--certfile PEM --keyfile PEM]\n");
        return 2;
    }
    const char *kind = argv[1];
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--lifetime"))
            lifetime = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--cpu"))
            cpu = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--certfile"))
            certfile = argv[i + 1];
        else if (!strcmp(argv[i], "--keyfile"))
            keyfile = argv[i + 1];
    }
    int tls = !strcmp(kind, "tls");
    if (!tls && strcmp(kind, "sock") && strcmp(kind, "streams") && strcmp(kind, "protocol")) {
        printf("{\"loop\": \"c-epoll\", \"unsupported\": \"no %s server in C\"}\n", kind);
        return UNSUPPORTED;
    }
    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        sched_setaffinity(0, sizeof set, &set);
    }
    signal(SIGPIPE, SIG_IGN);
    alarm(lifetime > 0 ? (unsigned)lifetime : 1); /* the hard self-timeout */

    if (tls) {
        /* as ssl.create_default_context(Purpose.CLIENT_AUTH) with the chain loaded */
        if (!certfile || !keyfile) {
            fprintf(stderr, "echo_server: tls needs --certfile and --keyfile\n");
            return 2;
        }
        ctx = SSL_CTX_new(TLS_server_method());
        if (!ctx)
            die("SSL_CTX_new");
        SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
        if (SSL_CTX_use_certificate_chain_file(ctx, certfile) != 1 ||
            SSL_CTX_use_PrivateKey_file(ctx, keyfile, SSL_FILETYPE_PEM) != 1)
            die("loading the certificate");
        SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    }

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET};
    inet_pton(AF_INET, HOST, &addr.sin_addr);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, BACKLOG) < 0)
        die("bind/listen");
    socklen_t alen = sizeof addr;
    getsockname(lfd, (struct sockaddr *)&addr, &alen);

    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die("epoll_create1");
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = &listener_tag};
    struct epoll_event sev = {.events = EPOLLIN, .data.ptr = &stdin_tag};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev) < 0 ||
        epoll_ctl(ep, EPOLL_CTL_ADD, STDIN_FILENO, &sev) < 0)
        die("epoll_ctl");
    printf("{\"port\": %d, \"pid\": %d, \"rss_kib\": %ld, \"peak_reset\": false}\n",
           ntohs(addr.sin_port), (int)getpid(), status_kib("VmRSS"));
    fflush(stdout);

    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int k = 0; k < n; k++) {
            struct conn *c = events[k].data.ptr;
            uint32_t ev = events[k].events;
            if (c == &listener_tag) {
                accept_all(lfd);
                continue;
            }
            if (c == &stdin_tag) { /* the runner closed our stdin (or died): stop */
                ssize_t r = read(STDIN_FILENO, buf, sizeof buf);
                if (r <= 0 && !(r < 0 && errno == EINTR))
                    return 0;
                continue;
            }
            int r;
            if (c->handshaking)
                r = on_handshake(c);
            else if (c->pending)
                r = (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)) ? on_writable(c) : 0;
            else
                r = on_readable(c);
            if (r < 0)
                drop(c);
        }
    }
}

/*
 * echo_client.c: the native echo client of the network benchmarks (net.py compiles it at run
 * time with `cc -O2 ... -lssl -lcrypto -lm`). It does exactly what `net_client.py echo` does, at a
 * fraction of its CPU cost per request, so that the client is not the bottleneck of a row:
 *
 *     echo_client echo --port P --size BYTES --conns C --duration S [--warmup S]
 *         [--server-pid PID] [--tls CAFILE] [--cpu N]
 *
 * C connections, each a closed loop: send one message of BYTES bytes, wait until all BYTES
 * have come back (one request), record the latency, send the next. Requests completed during
 * the --duration window after --warmup count. The first reply on every connection is checked
 * byte for byte. Prints one JSON line with the same fields as net_client.py: requests/s,
 * latency percentiles, the CPU share of this client, of the server (/proc/PID/stat) and of
 * every other process (/proc/stat) over the window; or {"error": ...} and exit status 1.
 *
 * --tls CAFILE: every connection speaks TLS (OpenSSL, a client context trusting only CAFILE,
 * certificate and host name "localhost" verified, SNI "localhost"); handshakes are done
 * blocking before the clock starts, then the connections run non-blocking on the same epoll.
 *
 * One thread, one level-triggered epoll, non-blocking sockets with TCP_NODELAY: the same
 * structure as the Python client, so the two measure the same thing.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HOST "127.0.0.1"
#define READ_SIZE (256 * 1024)
#define MAX_EVENTS 1024

/* One connection: the state of its current request. */
struct conn {
    int fd;
    SSL *ssl;       /* NULL without --tls */
    size_t sent;    /* bytes of the current request sent */
    size_t got;     /* bytes of the current reply received */
    double began;   /* when the current request was sent */
    int checking;   /* the first reply is compared byte for byte */
};

static long clk_tck;
static unsigned char *message; /* the request: bytes 0, 1, ..., 255, 0, 1, ... */
static size_t size;
static unsigned char buf[READ_SIZE];

/* Print {"error": ...} (the text JSON-escaped) and exit 1, as net_client.py does. */
static void fail(const char *fmt, ...)
{
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    fputs("{\"error\": \"", stdout);
    for (const char *p = text; *p; p++) {
        if (*p == '"' || *p == '\\')
            printf("\\%c", *p);
        else if ((unsigned char)*p < 0x20)
            printf("\\u%04x", (unsigned char)*p);
        else
            putchar(*p);
    }
    fputs("\"}\n", stdout);
    fflush(stdout);
    exit(1);
}

/* The last OpenSSL error as text (for fail()). */
static const char *ssl_error_text(void)
{
    static char text[256];
    unsigned long e = ERR_get_error();
    if (e == 0)
        return errno ? strerror(errno) : "unknown error";
    ERR_error_string_n(e, text, sizeof text);
    return text;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* what time.perf_counter reads on Linux */
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* CPU seconds (user + system) of this process. */
static double own_cpu(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec * 1e-6;
}

/* CPU seconds (utime + stime) of another process from /proc/PID/stat; -1 if unknown. */
static double process_cpu(long pid)
{
    char path[64], text[1024];
    if (pid <= 0)
        return -1;
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = 0;
    char *p = strrchr(text, ')'); /* the command name may hold spaces and parentheses */
    if (!p)
        return -1;
    unsigned long long utime, stime;
    /* after ")": state, then fields 4..13, then utime (14) and stime (15) */
    if (sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &utime,
               &stime) != 2)
        return -1;
    return (double)(utime + stime) / clk_tck;
}

/* CPU seconds all CPUs spent busy so far (/proc/stat: everything up to steal but idle and
 * iowait; guest time is inside user); -1 if unknown. */
static double machine_busy(void)
{
    unsigned long long t[8];
    FILE *f = fopen("/proc/stat", "r");
    if (!f)
        return -1;
    int n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &t[0], &t[1], &t[2], &t[3],
                   &t[4], &t[5], &t[6], &t[7]);
    fclose(f);
    if (n != 8)
        return -1;
    unsigned long long sum = 0;
    for (int i = 0; i < 8; i++)
        sum += t[i];
    return (double)(sum - t[3] - t[4]) / clk_tck;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The same index as net_client.percentile: round() of q * (n - 1), half to even. */
static double percentile(const double *sorted, size_t n, double q)
{
    double i = nearbyint(q * (double)(n - 1));
    if (i < 0)
        i = 0;
    if (i > (double)(n - 1))
        i = (double)(n - 1);
    return sorted[(size_t)i];
}

static void raise_nofile_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max == RLIM_INFINITY ? (1 << 20) : rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* Send what is left of the current request; 1 if it is all sent. */
static int send_rest(struct conn *c)
{
    ssize_t n;
    if (c->ssl) {
        n = SSL_write(c->ssl, message + c->sent, (int)(size - c->sent));
        if (n <= 0) {
            int e = SSL_get_error(c->ssl, (int)n);
            if (e != SSL_ERROR_WANT_WRITE && e != SSL_ERROR_WANT_READ)
                fail("SSLError: SSL_write: %s", ssl_error_text());
            n = 0;
        }
    } else {
        n = send(c->fd, message + c->sent, size - c->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                fail("OSError: send: [errno %d] %s", errno, strerror(errno));
            n = 0;
        }
    }
    c->sent += (size_t)n;
    return c->sent == size;
}

/* Read what the connection has, at most the rest of the reply; 0 when it would block.
 * Exits through fail() if the server closed the connection. */
static size_t recv_some(struct conn *c)
{
    size_t want = size - c->got;
    if (c->ssl) {
        int n = SSL_read(c->ssl, buf, (int)want);
        if (n > 0)
            return (size_t)n;
        int e = SSL_get_error(c->ssl, n);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
            return 0;
        if (e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && ERR_peek_error() == 0))
            fail("Failure: the server closed a connection");
        fail("SSLError: SSL_read: %s", ssl_error_text());
    }
    ssize_t n = recv(c->fd, buf, want, 0);
    if (n > 0)
        return (size_t)n;
    if (n == 0)
        fail("Failure: the server closed a connection");
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
        return 0;
    fail("OSError: recv: [errno %d] %s", errno, strerror(errno));
    return 0;
}

/* Print a JSON number, or null for "unknown" (negative). */
static void json_number(const char *key, double value, int last)
{
    if (value < 0)
        printf("\"%s\": null%s", key, last ? "" : ", ");
    else
        printf("\"%s\": %.17g%s", key, value, last ? "" : ", ");
}

static void usage(void)
{
    fprintf(stderr, "usage: echo_client echo --port P --size BYTES --conns C --duration S "
                    "[--warmup S] [--server-pid PID] [--tls CAFILE] [--cpu N]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    int port = 0, conns = 0, cpu = -1;
    double duration = 1.0, warmup = 0.25;
    long server_pid = 0;
    const char *cafile = NULL;

    if (argc < 2 || strcmp(argv[1], "echo") != 0)
        usage();
    for (int i = 2; i < argc; i++) {
        if (i + 1 >= argc)
            usage();
        const char *k = argv[i], *v = argv[++i];
        if (!strcmp(k, "--port"))
            port = atoi(v);
        else if (!strcmp(k, "--size"))
            size = (size_t)atol(v);
        else if (!strcmp(k, "--conns"))
            conns = atoi(v);
        else if (!strcmp(k, "--duration"))
            duration = atof(v);
        else if (!strcmp(k, "--warmup"))
            warmup = atof(v);
        else if (!strcmp(k, "--server-pid"))
            server_pid = atol(v);
        else if (!strcmp(k, "--tls"))
            cafile = v;
        else if (!strcmp(k, "--cpu"))
            cpu = atoi(v);
        else
            usage();
    }
    if (port <= 0 || size == 0 || conns <= 0 || duration <= 0)
        usage();
    if (size > READ_SIZE)
        fail("Failure: --size above %d bytes", READ_SIZE);
    clk_tck = sysconf(_SC_CLK_TCK);
    signal(SIGPIPE, SIG_IGN); /* a reset connection is an error to report, not a signal */
    if (cpu >= 0) {           /* run on one CPU (the runner's --pin) */
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        sched_setaffinity(0, sizeof set, &set);
    }
    raise_nofile_limit();

    message = malloc(size);
    if (!message)
        fail("MemoryError: the message");
    for (size_t i = 0; i < size; i++)
        message[i] = (unsigned char)i;

    SSL_CTX *ctx = NULL;
    if (cafile) {
        /* as ssl.create_default_context(Purpose.SERVER_AUTH, cafile=...): TLS 1.2 or
         * later, the peer's certificate verified against the CA and the host name */
        ctx = SSL_CTX_new(TLS_client_method());
        if (!ctx)
            fail("SSLError: SSL_CTX_new: %s", ssl_error_text());
        SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
        if (SSL_CTX_load_verify_locations(ctx, cafile, NULL) != 1)
            fail("SSLError: loading %s: %s", cafile, ssl_error_text());
        /* a partial write leaves the rest for the next EPOLLOUT, as with plain sockets */
        SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    }

    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, HOST, &addr.sin_addr);
    struct conn *cs = calloc((size_t)conns, sizeof *cs);
    if (!cs)
        fail("MemoryError: the connections");
    int one = 1;
    for (int i = 0; i < conns; i++) {
        struct conn *c = &cs[i];
        c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c->fd < 0)
            fail("OSError: socket: [errno %d] %s", errno, strerror(errno));
        struct timeval tv = {.tv_sec = 10}; /* socket.create_connection(..., timeout=10) */
        setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0)
            fail("OSError: connect: [errno %d] %s", errno, strerror(errno));
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (ctx) { /* the handshake, blocking, before the clock starts */
            c->ssl = SSL_new(ctx);
            SSL_set_fd(c->ssl, c->fd);
            SSL_set_tlsext_host_name(c->ssl, "localhost");
            SSL_set1_host(c->ssl, "localhost");
            if (SSL_connect(c->ssl) != 1)
                fail("SSLError: handshake: %s", ssl_error_text());
        }
        int flags = fcntl(c->fd, F_GETFL);
        if (flags < 0 || fcntl(c->fd, F_SETFL, flags | O_NONBLOCK) < 0)
            fail("OSError: fcntl: [errno %d] %s", errno, strerror(errno));
    }

    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        fail("OSError: epoll_create1: [errno %d] %s", errno, strerror(errno));
    size_t cap = 1 << 16, nlat = 0; /* every latency, in seconds */
    double *lat = malloc(cap * sizeof *lat);
    if (!lat)
        fail("MemoryError: latencies");
    int issuing = 1, measuring = 0, in_flight = 0;
    size_t count_from = 0, count_to = 0;
    double cpu0 = 0, cpu1 = 0, scpu0 = -1, scpu1 = -1, busy0 = -1, busy1 = -1, t0 = 0, t1 = 0;

    double now = now_s();
    double window_start = now + warmup, window_end = window_start + duration;
    for (int i = 0; i < conns; i++) {
        struct conn *c = &cs[i];
        c->checking = 1;
        c->began = now_s();
        in_flight++;
        struct epoll_event ev = {.events = send_rest(c) ? EPOLLIN : EPOLLIN | EPOLLOUT,
                                 .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0)
            fail("OSError: epoll_ctl: [errno %d] %s", errno, strerror(errno));
    }

    struct epoll_event events[MAX_EVENTS];
    double idle_since = now_s();
    while (in_flight) {
        int n = epoll_wait(ep, events, MAX_EVENTS, 500);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fail("OSError: epoll_wait: [errno %d] %s", errno, strerror(errno));
        }
        now = now_s();
        if (!measuring && now >= window_start) {
            measuring = 1;
            count_from = nlat;
            cpu0 = own_cpu(), scpu0 = process_cpu(server_pid), busy0 = machine_busy(), t0 = now;
        }
        if (issuing && now >= window_end) {
            issuing = 0;
            cpu1 = own_cpu(), scpu1 = process_cpu(server_pid), busy1 = machine_busy(), t1 = now;
            count_to = nlat;
        }
        if (n == 0) {
            if (now - idle_since > 10)
                fail("Failure: no progress for 10 s with %d requests in flight", in_flight);
            continue;
        }
        idle_since = now;
        for (int k = 0; k < n; k++) {
            struct conn *c = events[k].data.ptr;
            uint32_t ev = events[k].events;
            if ((ev & EPOLLOUT) && c->sent < size && send_rest(c)) {
                struct epoll_event mod = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &mod);
            }
            if (!(ev & (EPOLLIN | EPOLLHUP | EPOLLERR)))
                continue;
            for (;;) {
                size_t got = recv_some(c);
                if (got == 0)
                    break;
                if (c->checking && memcmp(buf, message + c->got, got) != 0)
                    fail("Failure: wrong bytes echoed at offset %zu", c->got);
                c->got += got;
                /* TLS: bytes already decrypted inside the SSL object do not wake epoll up */
                if (c->got == size || !c->ssl || !SSL_pending(c->ssl))
                    break;
            }
            if (c->got < size)
                continue;
            double done = now_s();
            if (nlat == cap) {
                cap *= 2;
                lat = realloc(lat, cap * sizeof *lat);
                if (!lat)
                    fail("MemoryError: latencies");
            }
            lat[nlat++] = done - c->began;
            c->checking = 0;
            if (c->sent < size)
                fail("Failure: the whole reply arrived before the whole request was sent");
            if (issuing) {
                c->got = c->sent = 0;
                c->began = done;
                if (!send_rest(c)) {
                    struct epoll_event mod = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &mod);
                }
            } else {
                in_flight--;
            }
        }
    }
    if (!measuring || issuing)
        fail("Failure: the measurement window never started or never ended");

    char negotiated[128] = "";
    if (ctx) /* as SSLSocket.version() and .cipher()[0] */
        snprintf(negotiated, sizeof negotiated, "%s %s", SSL_get_version(cs[0].ssl),
                 SSL_get_cipher_name(cs[0].ssl));
    for (int i = 0; i < conns; i++) {
        if (cs[i].ssl)
            SSL_free(cs[i].ssl);
        close(cs[i].fd);
    }
    close(ep);

    double window = t1 - t0;
    size_t requests = count_to - count_from;
    double *sample = lat + count_from;
    qsort(sample, requests, sizeof *sample, cmp_double);
    double server_cpu = scpu0 < 0 || scpu1 < 0 ? -1 : (scpu1 - scpu0) / window;
    double other_cpu = -1;
    if (busy0 >= 0 && busy1 >= 0 && server_cpu >= 0) {
        /* every other process on the machine (other users' work): how noisy was the window? */
        other_cpu = (busy1 - busy0) / window - (cpu1 - cpu0) / window - server_cpu;
        if (other_cpu < 0)
            other_cpu = 0;
    }
    printf("{\"requests\": %zu, ", requests);
    json_number("seconds", window, 0);
    json_number("rps", requests / window, 0);
    json_number("p50_ms", requests ? percentile(sample, requests, 0.50) * 1000 : -1, 0);
    json_number("p99_ms", requests ? percentile(sample, requests, 0.99) * 1000 : -1, 0);
    json_number("max_ms", requests ? sample[requests - 1] * 1000 : -1, 0);
    json_number("client_cpu", (cpu1 - cpu0) / window, 0);
    json_number("server_cpu", server_cpu, 0);
    json_number("other_cpu", other_cpu, !ctx);
    if (ctx)
        printf("\"tls\": \"%s\"", negotiated);
    printf("}\n");
    fflush(stdout);
    if (ctx)
        SSL_CTX_free(ctx);
    free(lat);
    free(cs);
    free(message);
    return 0;
}

/*
 * gate.c — the front door of kiln serve. One thread accepts connections
 * on the listening socket and reads each one's request head by peeking
 * (MSG_PEEK: nothing is consumed) under a deadline. A well-formed head
 * hands the connection to libmicrohttpd (MHD_add_connection), which then
 * reads the same bytes itself; anything else is answered here with an
 * OpenAI error object, never libmicrohttpd's HTML pages: a malformed
 * request line or header (400), a head not complete within the deadline
 * (408), a target over 8 KiB (414), a head over 16 KiB (431), an HTTP
 * version other than 1.0/1.1 (505), too many connections (503). A
 * chunked request goes to libmicrohttpd through a relay (relay.c), which
 * checks its body's framing at every offset: libmicrohttpd answers bad
 * chunk framing with an HTML page and offers no hook for it.
 *
 * Slow senders wait here, not in libmicrohttpd's connection limit, and
 * each client address gets a share: at most 3/4 of the pending heads and
 * 3/4 of the open connections (the rest stays for other clients).
 * Responses carry "Connection: close" (http.c), so every request passes
 * through the gate.
 *
 * Waiting for more bytes of a head without consuming them: poll wakes on
 * readable data, which is already there, so SO_RCVLOWAT is raised to one
 * byte more than was peeked; poll then wakes only when more arrived (or on
 * EOF, POLLRDHUP).
 */
#include <microhttpd.h> /* before serve.h: declares gate_notify */

#include "serve/serve.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define GATE_URI_MAX 8192
#define GATE_HEAD_MAX 16384

typedef struct ipkey {
    uint8_t a[16];
    int family;
} ipkey;

typedef struct pend {
    int fd;
    bool draining;       /* answered; discarding input until EOF */
    int peeked;          /* bytes seen at the last peek */
    double deadline;
    ipkey ip;
    struct sockaddr_storage sa;
    socklen_t salen;
} pend;

typedef struct ipcount {
    ipkey ip;
    int pending, active;
} ipcount;

struct gate {
    struct MHD_Daemon *d;
    int lfd, wake[2];
    pthread_t th;
    bool started;
    double head_secs;
    int max_pending, max_active, per_ip_pending, per_ip_active;
    pend *p;
    int np;
    pthread_mutex_t mu;  /* ips and active: MHD threads report closes */
    ipcount *ips;
    int n_ips, cap_ips;
    int active;
    gate_log_fn log;
    void *log_ud;
    relay_pool relays;   /* chunked requests' relay threads */
    char buf[GATE_HEAD_MAX + 1];
};

void gate_set_log(gate *g, gate_log_fn fn, void *ud)
{
    g->log = fn;
    g->log_ud = ud;
    g->relays.log = fn;
    g->relays.log_ud = ud;
}

static ipkey key_of(const struct sockaddr *sa)
{
    ipkey k;
    memset(&k, 0, sizeof k);
    k.family = sa->sa_family;
    if (sa->sa_family == AF_INET)
        memcpy(k.a, &((const struct sockaddr_in *)sa)->sin_addr, 4);
    else if (sa->sa_family == AF_INET6)
        memcpy(k.a, &((const struct sockaddr_in6 *)sa)->sin6_addr, 16);
    return k;
}

/* The counters of ip, created on first use; NULL when the table is full
 * (then the client gets no share of its own). mu held. */
static ipcount *ip_get(gate *g, const ipkey *ip)
{
    for (int i = 0; i < g->n_ips; i++)
        if (!memcmp(&g->ips[i].ip, ip, sizeof *ip)) return &g->ips[i];
    for (int i = 0; i < g->n_ips; i++)
        if (!g->ips[i].pending && !g->ips[i].active) {
            g->ips[i] = (ipcount){*ip, 0, 0};
            return &g->ips[i];
        }
    if (g->n_ips == g->cap_ips) return NULL;
    g->ips[g->n_ips] = (ipcount){*ip, 0, 0};
    return &g->ips[g->n_ips++];
}

/* One open connection of ip fewer. */
static void count_closed(gate *g, const ipkey *ip)
{
    pthread_mutex_lock(&g->mu);
    ipcount *c = ip_get(g, ip);
    if (g->active > 0) g->active--;
    if (c && c->active > 0) c->active--;
    pthread_mutex_unlock(&g->mu);
}

static const char *reason(int status)
{
    switch (status) {
    case 400: return "Bad Request";
    case 408: return "Request Timeout";
    case 414: return "URI Too Long";
    case 431: return "Request Header Fields Too Large";
    case 503: return "Service Unavailable";
    case 505: return "HTTP Version Not Supported";
    default: return "Error";
    }
}

/* Writes an OpenAI error response (best effort: a nonblocking socket with
 * an empty send buffer takes it whole). */
size_t gate_answer(int fd, int status, const char *type, const char *code, const char *msg)
{
    api_err e = {.status = status, .type = type, .code = code};
    snprintf(e.msg, sizeof e.msg, "%s", msg);
    char *j = api_error_json(&e);
    char head[256];
    int hl = snprintf(head, sizeof head,
                      "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                      "Content-Length: %zu\r\nConnection: close\r\n\r\n",
                      status, reason(status), j ? strlen(j) : 0);
    (void)!send(fd, head, (size_t)hl, MSG_NOSIGNAL | (j ? MSG_MORE : 0));
    size_t n = j ? strlen(j) : 0;
    if (j) (void)!send(fd, j, n, MSG_NOSIGNAL);
    free(j);
    return n;
}

/* Answers p and moves it to draining: its input is discarded until EOF
 * or a 2 s deadline, so closing does not reset the answer away. */
static void reject(gate *g, pend *p, int status, const char *type, const char *code,
                   const char *msg)
{
    size_t n = gate_answer(p->fd, status, type, code, msg);
    if (g->log)
        g->log(g->log_ud, (const struct sockaddr *)&p->sa, status, n,
               kiln_time_now() - (p->deadline - g->head_secs));
    int one = 1;
    setsockopt(p->fd, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof one);
    shutdown(p->fd, SHUT_WR);
    p->draining = true;
    p->deadline = kiln_time_now() + 2;
}

static void drop(gate *g, int i)
{
    close(g->p[i].fd);
    if (!g->p[i].draining) {
        pthread_mutex_lock(&g->mu);
        ipcount *c = ip_get(g, &g->p[i].ip);
        if (c && c->pending > 0) c->pending--;
        pthread_mutex_unlock(&g->mu);
    }
    g->p[i] = g->p[--g->np];
}

static bool is_tchar(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

/* Checks the request line b[0, ll) (without its line end). Returns 0, or
 * the status to answer with a message in msg. */
static int check_line(const char *b, size_t ll, char *msg, size_t cap)
{
    const char *sp1 = memchr(b, ' ', ll);
    const char *sp2 = sp1 ? memchr(sp1 + 1, ' ', ll - (size_t)(sp1 + 1 - b)) : NULL;
    bool ok = sp1 && sp2 && sp1 > b && sp2 > sp1 + 1;
    for (const char *c = b; ok && c < sp1; c++) ok = is_tchar((unsigned char)*c);
    for (const char *c = sp1 ? sp1 + 1 : b; ok && c < sp2; c++)
        ok = (unsigned char)*c > 32 && *c != 127;
    const char *ver = sp2 ? sp2 + 1 : NULL;
    size_t vl = ver ? ll - (size_t)(ver - b) : 0;
    ok = ok && vl == 8 && !memcmp(ver, "HTTP/", 5) && ver[5] >= '0' && ver[5] <= '9' &&
         ver[6] == '.' && ver[7] >= '0' && ver[7] <= '9';
    if (!ok) {
        snprintf(msg, cap, "malformed HTTP request line; expected 'METHOD /path HTTP/1.1'");
        return 400;
    }
    if ((size_t)(sp2 - sp1 - 1) > GATE_URI_MAX) {
        snprintf(msg, cap, "the request target is longer than %d bytes", GATE_URI_MAX);
        return 414;
    }
    if (ver[5] != '1' || (ver[7] != '0' && ver[7] != '1')) {
        snprintf(msg, cap, "HTTP version %.8s is not supported; use HTTP/1.1 or HTTP/1.0", ver);
        return 505;
    }
    return 0;
}

/* Checks a complete head b[0, n) (ending with its blank line). Returns 0,
 * or the status to answer with a message in msg. */
static int check_head(const char *b, size_t n, bool *is_chunked, char *msg, size_t cap)
{
    const char *eol = memchr(b, '\n', n);
    size_t ll = (size_t)(eol - b);
    if (ll && b[ll - 1] == '\r') ll--;
    int st = check_line(b, ll, msg, cap);
    if (st) return st;
    bool http11 = b[ll - 1] == '1';
    bool host = false, chunked = false, has_te = false, has_cl = false;
    const char *line = eol + 1;
    for (;;) {
        const char *e = memchr(line, '\n', n - (size_t)(line - b));
        size_t l = (size_t)(e - line);
        if (l && line[l - 1] == '\r') l--;
        if (l == 0) break; /* the blank line */
        const char *colon = memchr(line, ':', l);
        bool good = colon && colon > line;
        for (const char *c = line; good && c < colon; c++) good = is_tchar((unsigned char)*c);
        if (!good) {
            snprintf(msg, cap, "malformed header line '%.*s'", (int)KILN_MIN(l, 64), line);
            return 400;
        }
        size_t nl = (size_t)(colon - line);
        const char *v = colon + 1, *ve = line + l;
        while (v < ve && (*v == ' ' || *v == '\t')) v++;
        while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
        if (nl == 4 && !strncasecmp(line, "host", 4)) host = true;
        if (nl == 14 && !strncasecmp(line, "content-length", 14)) {
            bool digits = ve > v && ve - v <= 18;
            for (const char *c = v; digits && c < ve; c++) digits = *c >= '0' && *c <= '9';
            if (!digits || has_cl) {
                snprintf(msg, cap, "Content-Length must be one decimal number");
                return 400;
            }
            has_cl = true;
        }
        if (nl == 17 && !strncasecmp(line, "transfer-encoding", 17)) {
            has_te = true;
            chunked = ve - v == 7 && !strncasecmp(v, "chunked", 7);
        }
        line = e + 1;
    }
    *is_chunked = chunked;
    if (has_te && !chunked) {
        snprintf(msg, cap, "only 'Transfer-Encoding: chunked' is supported");
        return 400;
    }
    if (has_te && has_cl) {
        snprintf(msg, cap, "a request may not carry both Content-Length and Transfer-Encoding");
        return 400;
    }
    if (!host && http11) {
        snprintf(msg, cap, "an HTTP/1.1 request needs a Host header");
        return 400;
    }
    return 0;
}

/* Looks at p's bytes so far: hands it over, answers it, or waits. */
static void look(gate *g, int i, bool hup)
{
    pend *p = &g->p[i];
    if (p->draining) {
        ssize_t r;
        while ((r = recv(p->fd, g->buf, sizeof g->buf, MSG_DONTWAIT)) > 0) {}
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) drop(g, i);
        return;
    }
    ssize_t n = recv(p->fd, g->buf, sizeof g->buf, MSG_PEEK | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
    if (n <= 0 || (hup && n == p->peeked)) {
        drop(g, i); /* gone before its head was complete */
        return;
    }
    const char *b = g->buf;
    size_t len = (size_t)n;
    size_t end = 0;
    /* the head ends within its first GATE_HEAD_MAX bytes (the buffer also
     * holds the start of a chunked body) */
    const size_t hl = KILN_MIN(len, (size_t)GATE_HEAD_MAX);
    for (size_t k = 0; k + 1 < hl && !end; k++)
        if (b[k] == '\n' && (b[k + 1] == '\n' || (b[k + 1] == '\r' && k + 2 < hl && b[k + 2] == '\n')))
            end = k + (b[k + 1] == '\n' ? 2 : 3);
    char msg[200];
    if (!end) {
        /* a broken request line needs no more bytes to be refused */
        const char *eol = memchr(b, '\n', len);
        size_t k = 0;
        while (k < len && b[k] != ' ' && is_tchar((unsigned char)b[k])) k++;
        int st = 0;
        if (k < len && b[k] != ' ') {
            snprintf(msg, sizeof msg, "malformed HTTP request line; expected 'METHOD /path HTTP/1.1'");
            st = 400;
        } else if (eol) {
            size_t ll = (size_t)(eol - b);
            if (ll && b[ll - 1] == '\r') ll--;
            st = check_line(b, ll, msg, sizeof msg);
        }
        if (st) {
            reject(g, p, st, "invalid_request_error",
                   st == 505 ? "http_version_not_supported" : st == 414 ? "uri_too_long"
                                                                        : "malformed_request",
                   msg);
            goto unpend;
        }
        if (len <= GATE_HEAD_MAX) {
            p->peeked = (int)len;
            int low = (int)len + 1;
            setsockopt(p->fd, SOL_SOCKET, SO_RCVLOWAT, &low, sizeof low);
            return;
        }
        if (!memchr(b, '\n', hl)) {
            snprintf(msg, sizeof msg, "the request line is longer than %d bytes", GATE_HEAD_MAX);
            reject(g, p, 414, "invalid_request_error", "uri_too_long", msg);
        } else {
            snprintf(msg, sizeof msg, "the request headers are larger than %d bytes", GATE_HEAD_MAX);
            reject(g, p, 431, "invalid_request_error", "headers_too_large", msg);
        }
        goto unpend;
    }
    bool chunked = false;
    int st = check_head(b, end, &chunked, msg, sizeof msg);
    if (st) {
        reject(g, p, st, "invalid_request_error",
               st == 505 ? "http_version_not_supported" : st == 414 ? "uri_too_long"
                                                                    : "malformed_request",
               msg);
        goto unpend;
    }
    /* counted as open from the hand-over (MHD reports STARTED later, from
     * its own thread) until MHD reports it CLOSED */
    pthread_mutex_lock(&g->mu);
    ipcount *c = ip_get(g, &p->ip);
    bool full = g->active >= g->max_active || (c && c->active >= g->per_ip_active);
    if (!full) {
        g->active++;
        if (c) {
            c->active++;
            if (c->pending > 0) c->pending--;
        }
    }
    pthread_mutex_unlock(&g->mu);
    if (full) {
        reject(g, p, 503, "server_error", "too_many_connections",
               "too many open connections (from your address, or in all); retry later");
        goto unpend;
    }
    int one = 1;
    setsockopt(p->fd, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof one);
    ipkey ip = p->ip;
    int fd = p->fd;
    if (chunked) {
        /* the relay owns the client's socket from here; MHD gets the
         * other end of the relay's socketpair */
        fd = relay_start(&g->relays, p->fd, end, &p->sa);
        if (fd < 0) {
            count_closed(g, &ip);
            reject(g, p, 503, "server_error", "server_overloaded",
                   "cannot relay a chunked body now (out of memory or threads); retry later");
            return;
        }
    }
    /* MHD owns the socket from here, and closes it if it refuses it */
    if (MHD_add_connection(g->d, fd, (struct sockaddr *)&p->sa, p->salen) != MHD_YES)
        count_closed(g, &ip);
    g->p[i] = g->p[--g->np];
    return;
unpend:
    pthread_mutex_lock(&g->mu);
    c = ip_get(g, &p->ip);
    if (c && c->pending > 0) c->pending--;
    pthread_mutex_unlock(&g->mu);
}

static void accept_all(gate *g)
{
    for (;;) {
        struct sockaddr_storage sa;
        socklen_t sl = sizeof sa;
        int fd = accept4(g->lfd, (struct sockaddr *)&sa, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            /* out of descriptors: the listening socket stays readable, so
             * pause instead of spinning until connections close */
            if (errno == EMFILE || errno == ENFILE) poll(NULL, 0, 50);
            return;
        }
        ipkey ip = key_of((struct sockaddr *)&sa);
        pthread_mutex_lock(&g->mu);
        ipcount *c = ip_get(g, &ip);
        bool full = g->np >= g->max_pending || (c && c->pending >= g->per_ip_pending);
        if (!full && c) c->pending++;
        pthread_mutex_unlock(&g->mu);
        if (full) {
            size_t n = gate_answer(fd, 503, "server_error", "too_many_connections",
                              "too many connections waiting to send their request; retry later");
            if (g->log) g->log(g->log_ud, (const struct sockaddr *)&sa, 503, n, 0);
            close(fd);
            continue;
        }
        pend *p = &g->p[g->np++];
        *p = (pend){.fd = fd, .deadline = kiln_time_now() + g->head_secs, .ip = ip, .sa = sa,
                    .salen = sl};
    }
}

static void *gate_main(void *arg)
{
    gate *g = arg;
    struct pollfd *fds = calloc((size_t)g->max_pending + 2, sizeof *fds);
    if (!fds) return NULL;
    for (;;) {
        int nf = 0;
        fds[nf++] = (struct pollfd){g->wake[0], POLLIN, 0};
        fds[nf++] = (struct pollfd){g->lfd, g->np < g->max_pending ? POLLIN : 0, 0};
        double now = kiln_time_now(), next = now + 1;
        for (int i = 0; i < g->np; i++) {
            fds[nf++] = (struct pollfd){g->p[i].fd, POLLIN | POLLRDHUP, 0};
            if (g->p[i].deadline < next) next = g->p[i].deadline;
        }
        int ms = (int)((next - now) * 1000) + 1;
        int r = poll(fds, (nfds_t)nf, ms < 1 ? 1 : ms);
        if (r < 0 && errno != EINTR) break;
        if (fds[0].revents) break;
        /* pending sockets: back to front, as drop() moves the last one in */
        int np0 = g->np;
        for (int i = np0 - 1; i >= 0; i--) {
            short re = fds[2 + i].revents;
            if (re) look(g, i, (re & (POLLRDHUP | POLLHUP | POLLERR)) != 0);
        }
        now = kiln_time_now();
        for (int i = g->np - 1; i >= 0; i--) {
            if (g->p[i].deadline > now) continue;
            if (g->p[i].draining) {
                drop(g, i);
            } else {
                char msg[160];
                snprintf(msg, sizeof msg, "the request head did not arrive within %g s",
                         g->head_secs);
                reject(g, &g->p[i], 408, "invalid_request_error", "request_timeout", msg);
                pthread_mutex_lock(&g->mu);
                ipcount *c = ip_get(g, &g->p[i].ip);
                if (c && c->pending > 0) c->pending--;
                pthread_mutex_unlock(&g->mu);
            }
        }
        if (fds[1].revents) accept_all(g);
    }
    free(fds);
    return NULL;
}

/* MHD_OPTION_NOTIFY_CONNECTION: a handed-over connection closed (the
 * gate counted it open when it handed it over). */
void gate_notify(void *cls, struct MHD_Connection *c, void **socket_context,
                 enum MHD_ConnectionNotificationCode toe)
{
    (void)socket_context;
    gate *g = cls;
    if (!g || toe != MHD_CONNECTION_NOTIFY_CLOSED) return;
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    if (!ci || !ci->client_addr) return;
    ipkey ip = key_of(ci->client_addr);
    count_closed(g, &ip);
}

gate *gate_new(int lfd, int max_connections, double head_secs)
{
    gate *g = calloc(1, sizeof *g);
    if (!g) return NULL;
    g->lfd = lfd;
    g->wake[0] = g->wake[1] = -1;
    g->head_secs = head_secs;
    g->max_active = max_connections;
    g->per_ip_active = KILN_MAX(1, max_connections - max_connections / 4);
    g->max_pending = KILN_MAX(64, 2 * max_connections);
    g->per_ip_pending = KILN_MAX(1, g->max_pending - g->max_pending / 4);
    g->cap_ips = g->max_pending + max_connections;
    g->p = calloc((size_t)g->max_pending, sizeof *g->p);
    g->ips = calloc((size_t)g->cap_ips, sizeof *g->ips);
    pthread_mutex_init(&g->mu, NULL);
    /* nonblocking: accept_all() takes connections until EAGAIN */
    int fl = fcntl(lfd, F_GETFL);
    bool ok = g->p && g->ips && !pipe2(g->wake, O_CLOEXEC);
    /* relays end when the wake pipe turns readable (gate_stop) */
    relay_pool_init(&g->relays, g->wake[0], head_secs);
    if (!ok || fl < 0 || fcntl(lfd, F_SETFL, fl | O_NONBLOCK)) {
        gate_free(g);
        return NULL;
    }
    return g;
}

kiln_status gate_start(kiln_ctx *ctx, gate *g, struct MHD_Daemon *d)
{
    g->d = d;
    if (pthread_create(&g->th, NULL, gate_main, g) != 0)
        return kiln_fail(ctx, KILN_ERR_INTERNAL, "serve: cannot start the accept thread");
    g->started = true;
    return KILN_OK;
}

void gate_stop(gate *g)
{
    if (!g || !g->started) return;
    (void)!write(g->wake[1], "x", 1);
    pthread_join(g->th, NULL);
    g->started = false;
    while (g->np) drop(g, g->np - 1);
    relay_pool_wait(&g->relays);
}

void gate_free(gate *g)
{
    if (!g) return;
    gate_stop(g);
    if (g->lfd >= 0) close(g->lfd);
    if (g->wake[0] >= 0) close(g->wake[0]);
    if (g->wake[1] >= 0) close(g->wake[1]);
    pthread_mutex_destroy(&g->mu);
    relay_pool_destroy(&g->relays);
    free(g->p);
    free(g->ips);
    free(g);
}

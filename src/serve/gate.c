/*
 * gate.c — the front door of kiln serve. One thread accepts connections
 * on the listening socket and reads each one's request head by peeking
 * (MSG_PEEK: nothing is consumed) under a deadline. A well-formed head
 * hands the connection to libmicrohttpd (MHD_add_connection), which then
 * reads the same bytes itself; anything else is answered here with an
 * OpenAI error object, never libmicrohttpd's HTML pages: a malformed
 * request line or header (400), a head not complete within the deadline
 * (408), a target over 8 KiB (414), a head over 16 KiB (431), an HTTP
 * version other than 1.0/1.1 (505), too many connections (503), and a
 * chunked body whose framing is malformed within its first 32 KiB (400;
 * libmicrohttpd answers bad chunk framing with an HTML page and offers
 * no hook for it, so the gate keeps such a connection until the body's
 * end or its first 32 KiB have arrived, still by peeking, and checks
 * them).
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
/* A chunked body's framing is checked here over its first bytes, up to
 * this many (with the head, well inside a socket's default receive
 * buffer, so peeking never waits for bytes the client cannot send) */
#define GATE_BODY_PEEK 32768

typedef struct ipkey {
    uint8_t a[16];
    int family;
} ipkey;

typedef struct pend {
    int fd;
    bool draining;       /* answered; discarding input until EOF */
    int peeked;          /* bytes seen at the last peek */
    bool body;           /* the head is good: waiting for a chunked body's framing */
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
    char buf[GATE_HEAD_MAX + GATE_BODY_PEEK + 1];
};

void gate_set_log(gate *g, gate_log_fn fn, void *ud)
{
    g->log = fn;
    g->log_ud = ud;
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
static size_t answer(int fd, int status, const char *type, const char *code, const char *msg)
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
    size_t n = answer(p->fd, status, type, code, msg);
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

/* The framing of a chunked body's first n bytes (RFC 9112 7.1: hex size,
 * optional extension, CRLF, data, CRLF, ..., a zero size, trailer lines,
 * an empty line; bare LF is taken for CRLF, as libmicrohttpd does). 1:
 * complete, 0: good so far, -1: malformed (msg says why). */
static int chunk_scan(const char *b, size_t n, char *msg, size_t cap)
{
    size_t k = 0;
    for (;;) {
        uint64_t size = 0;
        int hex = 0;
        for (; k < n && isxdigit((unsigned char)b[k]); k++, hex++) {
            if (hex == 15) {
                snprintf(msg, cap, "malformed chunked body: a chunk size of more than 15 hex digits");
                return -1;
            }
            int c = (unsigned char)b[k];
            size = size * 16 + (uint64_t)(c <= '9' ? c - '0' : (c | 32) - 'a' + 10);
        }
        if (k == n) return 0;
        if (!hex) {
            snprintf(msg, cap, "malformed chunked body: a chunk starts with '%s%c' where its size in hex is due",
                     (unsigned char)b[k] < 32 ? "\\x" : "", (unsigned char)b[k] < 32 ? 'x' : b[k]);
            return -1;
        }
        while (k < n && (b[k] == ' ' || b[k] == '\t')) k++;
        if (k < n && b[k] == ';')
            while (k < n && b[k] != '\r' && b[k] != '\n') k++;
        if (k == n || (b[k] == '\r' && k + 1 == n)) return 0;
        if (b[k] == '\r' && b[k + 1] == '\n') k += 2;
        else if (b[k] == '\n') k++;
        else {
            snprintf(msg, cap, "malformed chunked body: the chunk size line has '%c' after the size",
                     (unsigned char)b[k] < 32 || (unsigned char)b[k] > 126 ? '?' : b[k]);
            return -1;
        }
        if (size == 0) {
            /* trailer lines, then an empty one */
            for (;;) {
                const char *e = memchr(b + k, '\n', n - k);
                if (!e) return 0;
                size_t l = (size_t)(e - (b + k));
                if (l && b[k + l - 1] == '\r') l--;
                if (l == 0) return 1;
                if (!memchr(b + k, ':', l)) {
                    snprintf(msg, cap, "malformed chunked body: a trailer line after the last chunk is not 'Name: value'");
                    return -1;
                }
                k = (size_t)(e - b) + 1;
            }
        }
        if (size >= n - k) return 0; /* the data, then CRLF, still coming */
        k += (size_t)size;
        if (b[k] == '\r' && k + 1 == n) return 0;
        if (b[k] == '\r' && b[k + 1] == '\n') k += 2;
        else if (b[k] == '\n') k++;
        else {
            snprintf(msg, cap, "malformed chunked body: a chunk's data is longer than its size (%llu bytes)",
                     (unsigned long long)size);
            return -1;
        }
    }
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
    if (n <= 0 || (hup && n == p->peeked && !p->body)) {
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
    if (chunked) {
        /* libmicrohttpd answers bad chunk framing with an HTML page of its
         * own and has no hook to change it: check the framing here while
         * the body fits the peek window (past it, what follows is
         * libmicrohttpd's to parse) */
        int cs = chunk_scan(b + end, len - end, msg, sizeof msg);
        if (cs < 0) {
            reject(g, p, 400, "invalid_request_error", "malformed_chunked_body", msg);
            goto unpend;
        }
        if (cs == 0 && len < sizeof g->buf - 1) {
            if (hup && n == p->peeked) {
                reject(g, p, 400, "invalid_request_error", "malformed_chunked_body",
                       "the chunked body ended (the client closed its side) before its last, "
                       "zero-size chunk");
                goto unpend;
            }
            p->body = true;
            p->peeked = (int)len;
            int low = (int)len + 1;
            setsockopt(p->fd, SOL_SOCKET, SO_RCVLOWAT, &low, sizeof low);
            return;
        }
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
    /* MHD owns the socket from here, and closes it if it refuses it */
    if (MHD_add_connection(g->d, p->fd, (struct sockaddr *)&p->sa, p->salen) != MHD_YES)
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
            size_t n = answer(fd, 503, "server_error", "too_many_connections",
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
                if (g->p[i].body)
                    snprintf(msg, sizeof msg,
                             "the chunked request body (its end, or its first %d bytes) did "
                             "not arrive within %g s", GATE_BODY_PEEK, g->head_secs);
                else
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
    if (!g->p || !g->ips || pipe2(g->wake, O_CLOEXEC) || fl < 0 ||
        fcntl(lfd, F_SETFL, fl | O_NONBLOCK)) {
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
}

void gate_free(gate *g)
{
    if (!g) return;
    gate_stop(g);
    if (g->lfd >= 0) close(g->lfd);
    if (g->wake[0] >= 0) close(g->wake[0]);
    if (g->wake[1] >= 0) close(g->wake[1]);
    pthread_mutex_destroy(&g->mu);
    free(g->p);
    free(g->ips);
    free(g);
}

/*
 * notls.c — the GnuTLS symbols that Debian's libmicrohttpd.a refers to,
 * for the statically linked edge build (`make static`) only; never linked
 * into the ordinary kiln, where libgnutls.so provides them.
 *
 * Why: Debian builds libmicrohttpd with HTTPS support, so its static
 * archive needs GnuTLS, and a static GnuTLS needs p11-kit, which Debian
 * ships as a shared library only. `kiln serve` never asks libmicrohttpd
 * for TLS (no MHD_USE_TLS; docs/serving.md puts TLS in a reverse proxy),
 * so the only GnuTLS calls that run are the two in libmicrohttpd's load
 * and unload hooks (gnutls_global_init, gnutls_global_deinit), which do
 * nothing here. Every other symbol is reachable only on a TLS daemon: it
 * says so on stderr and aborts, so a future TLS path can never run
 * silently without encryption.
 *
 * The declarations are deliberately not GnuTLS's: a C symbol carries no
 * type, and none of these (but the two hooks) is ever called. This file
 * includes no GnuTLS header and copies no GnuTLS code.
 */
#include <stdio.h>
#include <stdlib.h>

int gnutls_global_init(void);
void gnutls_global_deinit(void);

int gnutls_global_init(void) { return 0; }
void gnutls_global_deinit(void) {}

/* gnutls_malloc is a variable in GnuTLS (a function pointer). */
void *gnutls_malloc = NULL;

static void notls(const char *fn)
{
    fprintf(stderr,
            "kiln: %s: TLS is not part of the static build (libmicrohttpd "
            "without GnuTLS); put a TLS reverse proxy in front of kiln serve\n",
            fn);
    abort();
}

#define NOTLS(name)                         \
    int name(void);                         \
    int name(void)                          \
    {                                       \
        notls(#name);                       \
        return -1;                          \
    }

NOTLS(gnutls_alpn_set_protocols)
NOTLS(gnutls_bye)
NOTLS(gnutls_certificate_allocate_credentials)
NOTLS(gnutls_certificate_free_credentials)
NOTLS(gnutls_certificate_server_set_request)
NOTLS(gnutls_certificate_set_dh_params)
NOTLS(gnutls_certificate_set_retrieve_function2)
NOTLS(gnutls_certificate_set_retrieve_function3)
NOTLS(gnutls_certificate_set_x509_key_mem)
NOTLS(gnutls_certificate_set_x509_key_mem2)
NOTLS(gnutls_certificate_set_x509_trust_mem)
NOTLS(gnutls_cipher_get)
NOTLS(gnutls_credentials_set)
NOTLS(gnutls_deinit)
NOTLS(gnutls_dh_params_deinit)
NOTLS(gnutls_dh_params_import_pkcs3)
NOTLS(gnutls_dh_params_init)
NOTLS(gnutls_handshake)
NOTLS(gnutls_init)
NOTLS(gnutls_priority_deinit)
NOTLS(gnutls_priority_init)
NOTLS(gnutls_priority_set)
NOTLS(gnutls_protocol_get_version)
NOTLS(gnutls_psk_allocate_server_credentials)
NOTLS(gnutls_psk_free_server_credentials)
NOTLS(gnutls_psk_set_server_credentials_function)
NOTLS(gnutls_record_check_pending)
NOTLS(gnutls_record_get_direction)
NOTLS(gnutls_record_recv)
NOTLS(gnutls_record_send)
NOTLS(gnutls_session_get_ptr)
NOTLS(gnutls_session_set_ptr)
NOTLS(gnutls_strerror)
NOTLS(gnutls_transport_set_int2)

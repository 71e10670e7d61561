/* LD_PRELOAD shim that keeps a process's listeners on loopback.
 *
 * TFF's `worker_binary` listens on [::]:PORT (every interface) and has no
 * flag to choose the address. Preloaded into it, this `bind()` rewrites a
 * wildcard address to IPv4 loopback before the real `bind()` runs:
 *
 *   0.0.0.0                      -> 127.0.0.1
 *   :: or ::ffff:0.0.0.0, dual-stack socket (IPV6_V6ONLY off)
 *                                -> ::ffff:127.0.0.1 (IPv4 loopback)
 *   :: on an IPv6-only socket    -> ::1
 *
 * (IPv4 loopback for a dual-stack socket: `localhost` resolves to 127.0.0.1
 * on every host, to ::1 only on some.) A wildcard bind of a datagram socket
 * to port 0 (an outgoing client socket) and every other address are left
 * unchanged. Built by perfed_tff/runtime/loopback.py.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

static int is_stream(int fd) {
  int type = 0;
  socklen_t len = sizeof type;
  return getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 ||
         type == SOCK_STREAM || type == SOCK_SEQPACKET;
}

int bind(int fd, const struct sockaddr *addr, socklen_t addrlen) {
  static bind_fn real_bind;
  if (real_bind == NULL) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
  if (real_bind == NULL) {
    errno = ENOSYS;
    return -1;
  }
  if (addr != NULL && addr->sa_family == AF_INET &&
      addrlen >= (socklen_t)sizeof(struct sockaddr_in)) {
    struct sockaddr_in in4;
    memcpy(&in4, addr, sizeof in4);
    if (in4.sin_addr.s_addr == htonl(INADDR_ANY) &&
        (in4.sin_port != 0 || is_stream(fd))) {
      in4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      return real_bind(fd, (const struct sockaddr *)&in4, sizeof in4);
    }
  } else if (addr != NULL && addr->sa_family == AF_INET6 &&
             addrlen >= (socklen_t)sizeof(struct sockaddr_in6)) {
    struct sockaddr_in6 in6;
    memcpy(&in6, addr, sizeof in6);
    const unsigned char *b = in6.sin6_addr.s6_addr;
    int any4 = IN6_IS_ADDR_V4MAPPED(&in6.sin6_addr) && b[12] == 0 &&
               b[13] == 0 && b[14] == 0 && b[15] == 0;
    if ((IN6_IS_ADDR_UNSPECIFIED(&in6.sin6_addr) || any4) &&
        (in6.sin6_port != 0 || is_stream(fd))) {
      int v6only = 0;
      socklen_t len = sizeof v6only;
      if (getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &len) != 0)
        v6only = 0;
      if (any4 || !v6only) {
        static const unsigned char v4_loopback[16] = {
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1};
        memcpy(in6.sin6_addr.s6_addr, v4_loopback, sizeof v4_loopback);
      } else {
        in6.sin6_addr = in6addr_loopback;
      }
      in6.sin6_scope_id = 0;
      return real_bind(fd, (const struct sockaddr *)&in6, sizeof in6);
    }
  }
  return real_bind(fd, addr, addrlen);
}

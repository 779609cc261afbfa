# Three NixOS VMs, one kvraft node each, form a cluster from a static
# initialCluster, with TLS on the client, peer and metrics ports and client
# roles; the kvraft CLI writes through one node and reads through the others;
# a plaintext client and a read-only identity are refused; a node restarts and
# catches up. Run: nix build .#checks.x86_64-linux.vm-test
{ pkgs, self }:

let
  kvraft = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
  # A test-only PKI from `kvraft certs init`. Its keys end up in the
  # world-readable store, which is acceptable for throwaway VMs only; real
  # keys stay on the host (services.kvraft.tls.keyFile rejects store paths).
  pki = pkgs.runCommand "kvraft-test-pki" { nativeBuildInputs = [ kvraft ]; } ''
    kvraft certs init $out --nodes 1=node1,2=node2,3=node3 --clients admin,reader
  '';
  cluster = { "1" = "node1:7380"; "2" = "node2:7380"; "3" = "node3:7380"; };
  node = id: { pkgs, ... }: {
    imports = [ self.nixosModules.default ];
    # As an administrator would place them: root-only copies on the host
    # (mode makes etc copy the file instead of linking into the store).
    environment.etc = {
      "kvraft/tls/ca.pem".source = "${pki}/ca.pem";
      "kvraft/tls/node.pem".source = "${pki}/node-${toString id}.pem";
      "kvraft/tls/node.key" = { source = "${pki}/node-${toString id}.key"; mode = "0400"; };
    };
    environment.systemPackages = [ pkgs.curl ];
    services.kvraft = {
      enable = true;
      nodeId = id;
      clientAddr = "0.0.0.0:7379";
      peerAddr = "0.0.0.0:7380";
      # The test driver puts every node's name in /etc/hosts.
      advertiseClientAddr = "node${toString id}:7379";
      advertisePeerAddr = "node${toString id}:7380";
      initialCluster = cluster;
      openFirewall = true;
      settings.log_filter = "info";
      tls = {
        certFile = "/etc/kvraft/tls/node.pem";
        keyFile = "/etc/kvraft/tls/node.key";
        trustedCaFile = "/etc/kvraft/tls/ca.pem";
        clientCertAuth = true;
        clientRoles = { admin = "admin"; reader = "read"; };
        peerCertFile = "/etc/kvraft/tls/node.pem";
        peerKeyFile = "/etc/kvraft/tls/node.key";
        peerTrustedCaFile = "/etc/kvraft/tls/ca.pem";
        metricsTls = true;
      };
    };
  };
in
pkgs.testers.runNixOSTest {
  name = "kvraft-cluster";

  nodes = {
    node1 = node 1;
    node2 = node 2;
    node3 = node 3;
  };

  testScript = ''
    tls = "--cacert ${pki}/ca.pem --cert ${pki}/client-admin.pem --key ${pki}/client-admin.key"
    reader = "--cacert ${pki}/ca.pem --cert ${pki}/client-reader.pem --key ${pki}/client-reader.key"
    kv = f"kvraft {tls}"
    endpoints = "--endpoints node1:7379,node2:7379,node3:7379"
    nodes = [node1, node2, node3]

    start_all()
    for m in nodes:
        # READY=1 does not wait for a leader, so every unit becomes active.
        m.wait_for_unit("kvraft.service")
        m.wait_for_open_port(7379)

    with subtest("the cluster elects a leader over mutual TLS"):
        node1.wait_until_succeeds(f"{kv} {endpoints} members | grep -i leader", timeout=60)
        print(node1.succeed(f"{kv} {endpoints} members"))

    with subtest("set through one node, get through each"):
        node1.succeed(f"{kv} --endpoints node1:7379 set greeting hello")
        for m, name in [(node1, "node1"), (node2, "node2"), (node3, "node3")]:
            out = m.succeed(f"{kv} --endpoints {name}:7379 get greeting").strip()
            assert out == "hello", f"{name}: got {out!r}"

    with subtest("a plaintext client and a read-only identity are refused"):
        status, out = node1.execute("kvraft --endpoints node2:7379 ping 2>&1")
        assert status == 2 and "TLS" in out, f"plaintext client: exit {status}: {out}"
        node1.succeed(f"kvraft {reader} --endpoints node2:7379 get greeting")
        status, out = node1.execute(f"kvraft {reader} --endpoints node2:7379 set greeting no 2>&1")
        assert status == 4, f"reader's write: exit {status}: {out}"

    with subtest("the keys reach the dynamic user only as credentials; metrics over HTTPS"):
        node1.succeed("test \"$(stat -c %a /etc/kvraft/tls/node.key)\" = 400")
        node1.succeed("test -f /run/credentials/kvraft.service/key.pem")
        node1.succeed("curl -fsS --cacert ${pki}/ca.pem https://localhost:9379/health")

    with subtest("the unit is sandboxed, reports status and reloads"):
        node1.succeed("systemctl show kvraft -p StatusText --value | grep -q term")
        node1.succeed("test \"$(stat -c %a /var/lib/private/kvraft)\" = 700")
        node1.succeed("systemctl reload kvraft")
        node1.succeed("systemctl is-active kvraft")
        node1.succeed(f"{kv} --endpoints node1:7379 ping")

    with subtest("a restarted node catches up"):
        node3.succeed("systemctl stop kvraft")
        node1.succeed(f"{kv} {endpoints} set greeting again")
        node3.succeed("systemctl start kvraft")
        node3.wait_for_unit("kvraft.service")
        node3.wait_until_succeeds(
            f"test \"$({kv} --endpoints node3:7379 --serializable get greeting)\" = again", timeout=60
        )
  '';
}

// etcd built from go.etcd.io/etcd/server/v3 (its etcdmain package).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}

#!/bin/busybox sh
# /init of qsnap's test guest. It proves that memory and disk belong to the same instant:
# a counter lives both in this shell's memory and in the first sector of /dev/vda, written
# and read with O_DIRECT (no guest page cache) and flushed before `tick N` is printed, so a
# printed tick is durable: whatever happens to QEMU, the disk must keep it. After a restore
# from a snapshot memory and disk must still agree; if they ever differ the guest prints
# `MISMATCH disk=X mem=Y`.
#
# With a virtio-serial port named org.qemu.guest_agent.0 it runs the QEMU guest agent there;
# with a second disk (/dev/vdb) it makes an ext2 filesystem on it and mounts it at /mnt, so that
# the agent has a filesystem to freeze. The ACPI power button powers it off.
#
# Kernel parameters:
#   qsnap.tick_ms=N    pause between ticks (default 200)
#   qsnap.dirty_mb=N   keep rewriting N MiB of RAM in the background (default 0: off)
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm
mount -t tmpfs -o size=90% tmpfs /dev/shm

# Order resolved from each module's `depends=` when the kit was built (virtio_ring before virtio).
for m in $(cat /etc/modules.order); do
  insmod "/lib/modules/$m.ko" || echo "qsnap-guest: insmod $m failed"
done

tick_ms=200
dirty_mb=0
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    qsnap.tick_ms=*) tick_ms=${arg#qsnap.tick_ms=} ;;
    qsnap.dirty_mb=*) dirty_mb=${arg#qsnap.dirty_mb=} ;;
  esac
done

i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1))
  if [ $i -gt 100 ]; then echo "qsnap-guest: no /dev/vda"; break; fi
  sleep 0.1
done

# The guest agent, if QEMU gave it a port.
for port in /sys/class/virtio-ports/*; do
  [ -f "$port/name" ] || continue
  if [ "$(cat "$port/name")" = org.qemu.guest_agent.0 ]; then
    mkdir -p /var/run /tmp/qga
    qemu-ga -d -m virtio-serial -p "/dev/${port##*/}" -f /tmp/qga.pid -t /tmp/qga -l /tmp/qga.log \
      && echo "qsnap-guest: guest agent on /dev/${port##*/}"
  fi
done
if [ -b /dev/vdb ]; then
  mkdir -p /mnt
  mount -t ext4 /dev/vdb /mnt 2>/dev/null || { mke2fs /dev/vdb >/dev/null 2>&1 && mount -t ext4 /dev/vdb /mnt; } \
    && echo "qsnap-guest: /dev/vdb mounted on /mnt"
fi

# The ACPI power button (QEMU's system_powerdown): power off at its first event, as a
# distribution's acpid or systemd-logind would. `poweroff -f`: there is no init to go through.
for d in /sys/class/input/input*; do
  [ "$(cat "$d/name" 2>/dev/null)" = "Power Button" ] || continue
  for e in "$d"/event*; do
    [ -e "$e" ] || continue
    (dd if="/dev/input/${e##*/}" of=/dev/null bs=24 count=1 2>/dev/null \
      && echo "qsnap-guest: power button pressed, powering off" && sync && poweroff -f) &
    echo "qsnap-guest: power button on /dev/input/${e##*/}"
  done
done

if [ "$dirty_mb" -gt 0 ]; then
  dd if=/dev/urandom of=/dev/shm/src bs=1M count="$dirty_mb" 2>/dev/null
  (while :; do cp /dev/shm/src /dev/shm/dst; done) &
  echo "qsnap-guest: dirtying ${dirty_mb} MiB"
fi

read_disk() {
  line=$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -n 1)
  case "$line" in
    "QSNAPCTR "*) echo "${line#QSNAPCTR }" ;;
    *) echo none ;;
  esac
}

write_disk() {
  printf 'QSNAPCTR %s\n' "$1" | dd of=/dev/vda bs=512 count=1 conv=sync,notrunc,fsync oflag=direct 2>/dev/null
}

mem=$(read_disk)
[ "$mem" = none ] && mem=0
echo "qsnap-guest: ready counter=$mem"
interval=$(awk "BEGIN { printf \"%.3f\", $tick_ms / 1000 }")
while :; do
  disk=$(read_disk)
  if [ "$disk" != "$mem" ] && ! { [ "$disk" = none ] && [ "$mem" = 0 ]; }; then
    echo "MISMATCH disk=$disk mem=$mem"
  fi
  mem=$((mem + 1))
  write_disk "$mem"
  echo "tick $mem"
  sleep "$interval"
done

;; The throughput bench's floor: a 0.4.0 core module written by hand that
;; does what cost_router does for model `auto` with nothing but the ABI
;; (no allocation, no decoding, decisions encoded in advance). A prompt
;; over 2000 characters (without reading the model) or `x-tier: premium`
;; (exactly: cost_router also trims it and ignores case) goes to `large`,
;; all else to `small`, any other model too (cost_router would route to
;; the pool it names). `tests/proxy/bench_floor.rs` holds it to
;; cost_router's decisions.
(module
    (import "switchyard-0.4" "read"
        (func $read (param i32 i32 i32 i32 i32) (result i32)))
    (memory (export "memory") 1)
    ;; The two decisions: route, pool name, no cap, no escalation, no
    ;; attributes. Then the header's name, `auto` and `premium`.
    (data (i32.const 100) "\00\05\00\00\00small\00\00\00\00\00\00")
    (data (i32.const 200) "\00\05\00\00\00large\00\00\00\00\00\00")
    (data (i32.const 300) "x-tier")
    (data (i32.const 320) "auto")
    (data (i32.const 340) "premium")
    (func (export "switchyard-0.4:alloc") (param i32) (result i32)
        i32.const 4096)
    (func (export "switchyard-0.4:init") (param i32 i32) (result i64)
        i64.const 0)
    (func (export "switchyard-0.4:route")
        (param i32 i32 i64 i64 i32) (result i64)
        (local $n i32)
        ;; Packed results: (100 << 32) | 16 is small, (200 << 32) | 16 large.
        (if (i64.gt_u (local.get 2) (i64.const 2000))
            (then (return (i64.const 858993459216))))
        (local.set $n (call $read (i32.const 1) (i32.const 0) (i32.const 0)
            (i32.const 1024) (i32.const 256)))
        (if (i32.ne (local.get $n) (i32.const 4))
            (then (return (i64.const 429496729616))))
        (if (i32.ne (i32.load (i32.const 1024)) (i32.load (i32.const 320)))
            (then (return (i64.const 429496729616))))
        (local.set $n (call $read (i32.const 4) (i32.const 300) (i32.const 6)
            (i32.const 1536) (i32.const 64)))
        ;; Seven bytes compared as eight: the eighth, left from any
        ;; longer value read before, is masked off.
        (if (i32.eq (local.get $n) (i32.const 7))
            (then (if (i64.eq
                    (i64.and (i64.load (i32.const 1536))
                             (i64.const 72057594037927935))
                    (i64.load (i32.const 340)))
                (then (return (i64.const 858993459216))))))
        i64.const 429496729616)
    (func (export "switchyard-0.4:review")
        (param i32 i32 i64 i64 i32) (result i64)
        ;; Accept: the single byte 0 at address 0.
        i64.const 1))

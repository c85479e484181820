// Cooperative execution of one GPU thread block (CUDA block / Metal threadgroup)
// on the CPU, shared by the CUDA host shim (tests/cuda_shim) and the Metal shim
// (tests/metal_shim).
//
// Kernels without collectives run one thread after another (the shims' plain loop).
// Kernels with barriers, warp/simdgroup collectives or MMAs need the threads of a
// block to meet: here every thread of the block is a fiber (ucontext) with its own
// stack, and a round-robin scheduler runs each fiber until it finishes or waits.
//  - barrier(): every thread of the block must arrive (__syncthreads /
//    threadgroup_barrier); the threads are released together.
//  - warp_exchange(): every lane of a warp/simdgroup posts a payload and gets the
//    whole warp's table back: shuffles, reductions and mma.sync are computed from it.
// A thread that exits while others wait, lanes in different collectives, or a
// barrier some threads never reach is reported as an error (real hardware would
// hang or be undefined), instead of silently computing something.
//
// Not modelled: memory ordering and races (fibers switch only at collectives, so
// every thread sees every earlier write), independent thread scheduling inside a
// warp, and timing.
#pragma once
#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

namespace gpu_threads {

constexpr unsigned WARP = 32;
constexpr unsigned MAX_PAYLOAD = 64;         // bytes per lane in a warp exchange
constexpr size_t STACK_BYTES = 128 * 1024;  // per fiber

struct Warp {
  unsigned arrived = 0;
  unsigned long gen = 0;
  int tag = 0;
  // Two tables, alternating by generation: a lane released from exchange g may
  // post into exchange g + 1 before slower lanes have read table g.
  unsigned char table[2][WARP][MAX_PAYLOAD];
};

struct Block {
  unsigned size = 0;
  unsigned current = 0;
  unsigned long progress = 0;  // arrivals and exits: no change in a whole pass = deadlock
  unsigned barrier_arrived = 0;
  unsigned long barrier_gen = 0;
  const char* error = nullptr;
  std::function<void(unsigned)> body;
  void (*on_resume)(unsigned) = nullptr;
  std::vector<ucontext_t> ctx;
  std::vector<char> done;
  std::vector<Warp> warps;
  ucontext_t scheduler;
};

inline Block*& active() {
  static thread_local Block* block = nullptr;
  return block;
}

inline std::vector<char>& stacks() {
  static thread_local std::vector<char> memory;
  return memory;
}

inline void yield() {
  Block* b = active();
  swapcontext(&b->ctx[b->current], &b->scheduler);
}

// Stop the block: the scheduler returns `message`; this fiber is never resumed.
[[noreturn]] inline void fail(const char* message) {
  Block* b = active();
  b->error = message;
  swapcontext(&b->ctx[b->current], &b->scheduler);
  __builtin_trap();
}

inline unsigned thread_index() { return active()->current; }
inline unsigned lane_index() { return active()->current % WARP; }

inline void barrier() {
  Block* b = active();
  if (b == nullptr) fail("barrier outside a cooperative launch");
  const unsigned long gen = b->barrier_gen;
  b->progress++;
  if (++b->barrier_arrived == b->size) {
    b->barrier_arrived = 0;
    b->barrier_gen++;
    return;
  }
  while (b->barrier_gen == gen) yield();
}

// Post `bytes` of `mine` for this lane; returns the warp's table (lane l's payload
// at table + l * MAX_PAYLOAD) once every lane of the warp has posted. `tag` names
// the collective: lanes meeting in different collectives are an error.
inline const unsigned char* warp_exchange(int tag, const void* mine, unsigned bytes) {
  Block* b = active();
  const unsigned t = b->current;
  Warp& w = b->warps[t / WARP];
  const unsigned lanes = (b->size - (t / WARP) * WARP) < WARP ? b->size - (t / WARP) * WARP : WARP;
  if (w.arrived == 0) {
    w.tag = tag;
  } else if (w.tag != tag) {
    fail("the lanes of a warp/simdgroup are in different collectives");
  }
  const unsigned long gen = w.gen;
  unsigned char* table = &w.table[gen & 1][0][0];
  std::memcpy(table + (t % WARP) * MAX_PAYLOAD, mine, bytes);
  b->progress++;
  if (++w.arrived == lanes) {
    w.arrived = 0;
    w.gen++;
  } else {
    while (w.gen == gen) yield();
  }
  return table;
}

inline unsigned warp_lanes() {
  Block* b = active();
  const unsigned first = (b->current / WARP) * WARP;
  return b->size - first < WARP ? b->size - first : WARP;
}

inline void trampoline(int tid) {
  Block* b = active();
  b->body(unsigned(tid));
  b->done[tid] = 1;
  b->progress++;
  swapcontext(&b->ctx[tid], &b->scheduler);
}

// Run `body(thread index)` for the `size` threads of one block, as fibers. Returns
// nullptr, or a message if the block broke a collective's rules.
inline const char* run_block(unsigned size, std::function<void(unsigned)> body,
                             void (*on_resume)(unsigned) = nullptr) {
  Block b;
  b.size = size;
  b.body = std::move(body);
  b.on_resume = on_resume;
  b.ctx.resize(size);
  b.done.assign(size, 0);
  b.warps.resize((size + WARP - 1) / WARP);
  std::vector<char>& mem = stacks();
  if (mem.size() < size * STACK_BYTES) mem.resize(size * STACK_BYTES);
  Block* outer = active();
  active() = &b;
  for (unsigned t = 0; t < size; t++) {
    getcontext(&b.ctx[t]);
    b.ctx[t].uc_stack.ss_sp = mem.data() + size_t(t) * STACK_BYTES;
    b.ctx[t].uc_stack.ss_size = STACK_BYTES;
    b.ctx[t].uc_link = nullptr;
    makecontext(&b.ctx[t], reinterpret_cast<void (*)()>(trampoline), 1, int(t));
  }
  for (;;) {
    const unsigned long before = b.progress;
    bool live = false;
    for (unsigned t = 0; t < size && b.error == nullptr; t++) {
      if (b.done[t]) continue;
      live = true;
      b.current = t;
      if (b.on_resume) b.on_resume(t);
      swapcontext(&b.scheduler, &b.ctx[t]);
    }
    if (b.error != nullptr || !live) break;
    if (b.progress == before) {
      b.error = "deadlock: threads of a block wait at a barrier or collective that others never reach";
      break;
    }
  }
  active() = outer;
  return b.error;
}

}  // namespace gpu_threads

/* The CUDA symbols torchvision 0.28's _C.so (PyPI, CUDA build) links against, each aborting if
   called: see build_torchvision_stub.sh for why and how it is used. */
#include <stdlib.h>
void stub_fn_0(void) __asm__("_ZN2at4cuda26getCurrentDevicePropertiesEv");
void stub_fn_0(void) { abort(); }
void stub_fn_1(void) __asm__("_ZN3c104cuda12device_countEv");
void stub_fn_1(void) { abort(); }
void stub_fn_2(void) __asm__("_ZN3c104cuda14ExchangeDeviceEa");
void stub_fn_2(void) { abort(); }
void stub_fn_3(void) __asm__("_ZN3c104cuda14MaybeSetDeviceEa");
void stub_fn_3(void) { abort(); }
void stub_fn_4(void) __asm__("_ZN3c104cuda14current_deviceEv");
void stub_fn_4(void) { abort(); }
void stub_fn_5(void) __asm__("_ZN3c104cuda17getStreamFromPoolEba");
void stub_fn_5(void) { abort(); }
void stub_fn_6(void) __asm__("_ZN3c104cuda17getStreamFromPoolEia");
void stub_fn_6(void) { abort(); }
void* stub_data_7[64] __asm__("_ZN3c104cuda20CUDACachingAllocator9allocatorE");
void stub_fn_8(void) __asm__("_ZN3c104cuda20getCurrentCUDAStreamEa");
void stub_fn_8(void) { abort(); }
void stub_fn_9(void) __asm__("_ZN3c104cuda20getDefaultCUDAStreamEa");
void stub_fn_9(void) { abort(); }
void stub_fn_10(void) __asm__("_ZN3c104cuda20setCurrentCUDAStreamENS0_10CUDAStreamE");
void stub_fn_10(void) { abort(); }
void stub_fn_11(void) __asm__("_ZN3c104cuda29c10_cuda_check_implementationEiPKcS2_jb");
void stub_fn_11(void) { abort(); }
void stub_fn_12(void) __asm__("_ZN3c104cuda9GetDeviceEPa");
void stub_fn_12(void) { abort(); }
void stub_fn_13(void) __asm__("_ZN3c104cuda9SetDeviceEab");
void stub_fn_13(void) { abort(); }
void stub_fn_14(void) __asm__("_ZNK3c104cuda10CUDAStream11synchronizeEv");
void stub_fn_14(void) { abort(); }
void stub_fn_15(void) __asm__("_ZNK3c104cuda10CUDAStream5queryEv");
void stub_fn_15(void) { abort(); }
void stub_fn_16(void) __asm__("_ZNK3c104cuda10CUDAStream6streamEv");
void stub_fn_16(void) { abort(); }
